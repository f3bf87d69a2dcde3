"""Compile and verify on a Ray cluster (`fluxc compile/verify --cluster ADDRESS`).

Ray is an optional extra (`pip install "fluxc[cluster]"`); nothing outside this package
imports it, and this package imports it only when a command is given --cluster.

    connect.py  the one door to Ray: the install hint, connecting, the nodes alive
    node.py     what each node checks before it works: the export's manifest sha256 on the
                shared path, the shared build cache, the TPU-MLIR toolchain (installed once
                under its lock, or a one-line error naming the node)
    compile.py  the compile's jobs (fluxc/compile/schedule.py: same order, same memory figure)
                as Ray tasks with memory= declared, results in the shared content-keyed cache
    verify.py   verify's per-piece simulator checks as Ray tasks, with each piece's node and time

Inputs reach the nodes through a path every node mounts (the workspace: export and build
cache); see README "Compiling on a Ray cluster" for why not the object store.
"""
