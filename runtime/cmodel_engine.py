"""CmodelEngine: a (combined) bmodel on TPU-MLIR's chip simulator, run by a worker process
(runtime/cmodel_client.py)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from fluxc.errors import FluxcError
from fluxc.runtime.cmodel_client import CmodelWorker, close_worker, new_worker
from fluxc.runtime.engine import Engine, NetInfo, TensorInfo


class CmodelEngine(Engine):
    """A (combined) bmodel on the BM1684X simulator."""

    def __init__(self, path: Path, worker: CmodelWorker | None = None, chip: str = "BM1684X"):
        self.path = Path(path)
        self.chip = chip  # the simulator to run it on (TPU-MLIR's name: BM1684X, BM1688)
        if not self.path.is_file():
            raise FluxcError(f"missing bmodel {self.path}; run fluxc compile")
        self._own = worker is None
        self.worker = worker or new_worker()
        self.key = self.worker.new_key()
        try:
            h, _ = self.worker.request({"op": "load", "key": self.key, "path": str(self.path.resolve()),
                                         "chip": self.chip})
        except FluxcError as e:
            self.close()
            raise FluxcError(f"cannot load {self.path} on the chip simulator ({str(e).splitlines()[0]}); "
                             "the file is damaged or not a BM1684X bmodel: rebuild it with fluxc compile") from None
        self.nets = {n["name"]: NetInfo(n["name"],
                                        [TensorInfo(t["name"], tuple(t["shape"]), t["dtype"]) for t in n["inputs"]],
                                        [TensorInfo(t["name"], tuple(t["shape"]), t["dtype"]) for t in n["outputs"]])
                     for n in h["nets"]}

    def process(self, net: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self._check_net(net)
        names = list(inputs)
        h, outs = self.worker.request({"op": "run", "key": self.key, "net": net, "arrays": names},
                                      [np.asarray(inputs[n]) for n in names])
        self.last_forward_s = h.get("forward_s")
        return dict(zip(h["arrays"], outs))

    def close(self) -> None:
        if self._own:
            close_worker(self.worker)
