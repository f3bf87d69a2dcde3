"""FLUX.1 on sophon.sail as the board runs it (and on the stand-in, runtime/sail_sim.py).

Device memory is held like sophon-demo's runtime holds it: one device tensor per role and
chip (and distinct shape), shared by every net of a kind; a block's outputs are written over its inputs (the
next block's inputs); activations stay on the chips for the whole step; between chips
(the BF16 split) tensors are copied device to device. The host sees token ids going in,
latents (and the timestep / guidance scalars) going in, the noise prediction of each step
and the image coming out; the rotary table is written once.

Roles (the tensors of one chip), by the nets that use them (piece contract, docs/DESIGN.md):
  clip.ids clip.hidden clip.pooled | t5.ids t5.hidden | head.latents head.timestep
  head.guidance head.pooled head.t5 | temb enc hid rotary single noise | vae.latents vae.image
  | enc.image enc.out (the VAE encoder of an image-input build)
head.pooled / head.t5 are clip.pooled / t5.hidden themselves when the head is on the same
chip as CLIP / T5, else copies made chip to chip once per prompt.

Shapes and dtypes are the nets' own; before anything is allocated every net is checked
against the build's piece specs (names, shapes, dtypes: what this runtime feeds), so a
mismatch is a one-line error and nothing runs.

Several image sizes (a size-dependent net merged as one stage per size, docs/DESIGN.md): the
stage of each size is the one whose input shapes are that size's specs (read per stage with
`get_input_tensors_addrmode0(net, stage)`, as the reference reads a net's tensors); every size's
tensors are allocated when the build is opened, one per role, chip and distinct shape (the
reference's one set per distinct shape), so the text encoders' tensors, temb and enc are shared
by all sizes; each call runs the stage its tensors' shapes select (bmruntime's rule), chosen by
the latents' shape. The rotary table is written into a size's tensor before its first step (and
again only if another size of the same shape wrote it since).
"""
from __future__ import annotations

import numpy as np

from fluxc.errors import FluxcError
from fluxc.runtime.device_memory import PlannedTensor
from fluxc.runtime.engine import NetInfo, TensorInfo

# (input name -> role, output name -> role) per kind of piece (fluxc.specs.KINDS)
ROLES: dict[str, tuple[dict[str, str], dict[str, str]]] = {
    "clip_head": ({"input_ids": "clip.ids"}, {"hidden_states": "clip.hidden"}),
    "clip_block": ({"hidden_states": "clip.hidden"}, {"hidden_states_out": "clip.hidden"}),
    "clip_tail": ({"hidden_states": "clip.hidden", "input_ids": "clip.ids"}, {"pooled": "clip.pooled"}),
    "t5_head": ({"input_ids": "t5.ids"}, {"hidden_states": "t5.hidden"}),
    "t5_block": ({"hidden_states": "t5.hidden"}, {"hidden_states_out": "t5.hidden"}),
    "t5_tail": ({"hidden_states": "t5.hidden"}, {"encoder_hidden_states": "t5.hidden"}),
    "transformer_head": ({"hidden_states": "head.latents", "timestep": "head.timestep", "guidance": "head.guidance",
              "pooled_projections": "head.pooled", "encoder_hidden_states": "head.t5"},
             {"temb": "temb", "encoder_hidden_states_out": "enc", "hidden_states_out": "hid"}),
    "double_block": ({"hidden_states": "hid", "encoder_hidden_states": "enc", "temb": "temb", "rotary_emb": "rotary"},
               {"encoder_hidden_states_out": "enc", "hidden_states_out": "hid"}),
    "single_block": ({"hidden_states": "single", "temb": "temb", "rotary_emb": "rotary"},
                     {"hidden_states_out": "single"}),
    "transformer_tail": ({"hidden_states": "hid", "temb": "temb"}, {"noise_pred": "noise"}),
    "vae": ({"latents": "vae.latents"}, {"image": "vae.image"}),
}
ROLES["tiny_vae"] = ROLES["vae"]
# the VAE encoder of an image-input build (issue 19): its output goes back to the host, which
# samples and noises the latents as diffusers does
ROLES["vae_encoder"] = ({"image": "enc.image"}, {"moments": "enc.out"})
ROLES["tiny_vae_encoder"] = ({"image": "enc.image"}, {"latents": "enc.out"})
HOST_ROLES = {"noise", "vae.image", "enc.out"}  # the only tensors read back by the host


def output_name(got: str, wanted: list[str]) -> str | None:
    """The spec name of a net output: the same name, or the name plus a suffix TPU-MLIR
    adds (e.g. noise_pred_Add_f32); never by position."""
    if got in wanted:
        return got
    cands = [w for w in wanted if got.startswith(w + "_")]
    return max(cands, key=len) if cands else None


def kinds_of(specs: dict) -> dict[str, str]:
    """Net name -> piece kind, from the build's piece specs (net name -> spec)."""
    return {n: s.kind for n, s in specs.items()}


def io_plan(nets: dict, where: dict[str, int], kinds: dict[str, str]) -> tuple[list[PlannedTensor], dict[str, tuple[list, list]]]:
    """The device tensors a FLUX build needs at one image size and, per net, the key
    (device, role, shape) of each of its inputs and outputs in the net's own order. `nets`: net
    name -> object with `.inputs` and `.outputs` (each with name, shape, dtype): the opened nets
    (runtime) or the build's piece specs (compile, verify). `where`: net -> device; `kinds`:
    net -> piece kind (`kinds_of`). Same-role tensors on one chip are one tensor; the nets must
    agree on its shape and dtype."""
    tensors, (binds,) = io_plan_sizes([nets], where, kinds)
    return tensors, binds


def io_plan_sizes(sizes: list[dict], where: dict[str, int], kinds: dict[str, str]
                  ) -> tuple[list[PlannedTensor], list[dict[str, tuple[list, list]]]]:
    """io_plan over every image size of a build (`sizes`: one `nets` mapping per size, each net
    with its shapes at that size, i.e. the stage of that size). As sophon-demo's runtime does,
    there is one device tensor per role, chip and distinct shape: a role whose shape is the same
    at every size (text encoders, temb, enc) is one tensor shared by all sizes, a size-dependent
    role (hid, single, rotary, latents, noise, VAE) has one tensor per distinct shape. Returns
    the union of the tensors and, per size, the binds of every net (keys (device, role, shape))."""
    union: dict[tuple, PlannedTensor] = {}
    all_binds = []
    for nets in sizes:
        tensors, binds = _io_plan_one(nets, where, kinds)
        for pt in tensors:
            key = (pt.device, pt.role, pt.shape)
            have = union.setdefault(key, pt)
            if have.dtype != pt.dtype:
                raise FluxcError(f"the {pt.role} tensor {list(pt.shape)} on device {pt.device} is {have.dtype} at one "
                                 f"image size and {pt.dtype} at another; rebuild with fluxc compile")
        all_binds.append(binds)
    return list(union.values()), all_binds


def _io_plan_one(nets: dict, where: dict[str, int], kinds: dict[str, str]) -> tuple[list[PlannedTensor], dict[str, tuple[list, list]]]:
    head = next((n for n in nets if kinds.get(n) == "transformer_head"), None)
    clip_tail = next((n for n in nets if kinds.get(n) == "clip_tail"), None)
    t5_tail = next((n for n in nets if kinds.get(n) == "t5_tail"), None)
    alias: dict[tuple[int, str], tuple[int, str]] = {}
    if head and clip_tail and where[head] == where[clip_tail]:
        alias[(where[head], "head.pooled")] = (where[head], "clip.pooled")
    if head and t5_tail and where[head] == where[t5_tail]:
        alias[(where[head], "head.t5")] = (where[head], "t5.hidden")
    tensors: dict[tuple[int, str], PlannedTensor] = {}
    binds: dict[str, tuple[list, list]] = {}
    for net, info in nets.items():
        if kinds.get(net) not in ROLES:
            raise FluxcError(f"net {net!r} is not a FLUX.1 piece of this build; rebuild with fluxc compile")
        ins_role, outs_role = ROLES[kinds[net]]
        d = where[net]
        sides = []
        for kind, ios, table in (("input", info.inputs, ins_role), ("output", info.outputs, outs_role)):
            keys = []
            for t in ios:
                name = t.name if kind == "input" else output_name(t.name, list(table))
                if name not in table:
                    raise FluxcError(f"net {net}: {kind} {t.name!r} is not one this runtime knows "
                                     f"({', '.join(table)}); rebuild it with fluxc compile")
                key = alias.get((d, table[name]), (d, table[name]))
                pt = PlannedTensor(key[0], key[1], tuple(int(x) for x in t.shape), t.dtype, key[1] in HOST_ROLES)
                have = tensors.setdefault(key, pt)
                if (have.shape, have.dtype) != (pt.shape, pt.dtype):
                    raise FluxcError(f"net {net}: {kind} {t.name} is {pt.dtype} {list(pt.shape)} but the shared "
                                     f"{key[1]} tensor on device {d} is {have.dtype} {list(have.shape)}; "
                                     "the nets of this build do not fit together: rebuild with fluxc compile")
                keys.append((key[0], key[1], pt.shape))
            sides.append(keys)
        binds[net] = (sides[0], sides[1])
    return list(tensors.values()), binds


def stage_net(eng, net: str, spec):
    """The NetInfo of `net` (names as the engine presents them) at the stage whose input shapes
    are the spec's: the stage bmruntime will run when fed tensors of those shapes. A net of one
    stage is returned as it is (check_nets then names any mismatch); a net of several stages
    none of which fits gets a one-line error."""
    info = eng.nets[net]
    stages = (getattr(eng, "stage_shapes", None) or {}).get(net) or []
    if len(stages) <= 1:
        return info
    want = [tuple(int(x) for x in t.shape) for t in spec.inputs]
    for ins, outs in stages:
        if [tuple(x) for x in ins] == want:
            return NetInfo(net, [TensorInfo(t.name, tuple(sh), t.dtype) for t, sh in zip(info.inputs, ins)],
                           [TensorInfo(t.name, tuple(sh), t.dtype) for t, sh in zip(info.outputs, outs)])
    have = "; ".join(" ".join(str(list(x)) for x in ins) for ins, _ in stages)
    raise FluxcError(f"{eng.path.name}: net {net} has no stage taking {' '.join(str(list(x)) for x in want)} "
                     f"(its {len(stages)} stages take {have}); rebuild with fluxc compile")


def check_nets(engines_nets: dict[str, object], specs: dict, files: dict[str, str]) -> None:
    """Every net the build needs, with the spec's input names, shapes and dtypes (what this
    runtime feeds) and outputs; every file holding only nets of the build. One-line errors."""
    missing = [n for n in specs if n not in engines_nets]
    extra = [n for n in engines_nets if n not in specs]
    if extra:
        n = extra[0]
        raise FluxcError(f"{files[n]} holds net {n!r}, which this build does not have ({len(extra)} such); "
                         "the bmodels do not match the export: rebuild them with fluxc compile")
    if missing:
        raise FluxcError(f"no bmodel holds net {missing[0]!r} ({len(missing)} missing); the bmodels do not "
                         "match the export: rebuild them with fluxc compile")
    for n, spec in specs.items():
        net = engines_nets[n]
        got = {t.name: t for t in net.inputs}
        for w in spec.inputs:
            g = got.get(w.name)
            if g is None:
                raise FluxcError(f"{files[n]}: net {n} has no input {w.name!r} (it has {', '.join(got)}); "
                                 "inputs are matched by name, never by position: rebuild with fluxc compile")
            if g.dtype != w.dtype:
                raise FluxcError(f"{files[n]}: net {n} input {w.name} is {g.dtype}, the runtime feeds {w.dtype} "
                                 "(the build's piece contract); rebuild with fluxc compile")
            if tuple(g.shape) != tuple(w.shape):
                raise FluxcError(f"{files[n]}: net {n} input {w.name} has shape {list(g.shape)}, the build has "
                                 f"{list(w.shape)}; rebuild with fluxc compile")
        if len(net.inputs) != len(spec.inputs):
            raise FluxcError(f"{files[n]}: net {n} has {len(net.inputs)} inputs, the build has {len(spec.inputs)}")
        wanted = [t.name for t in spec.outputs]
        for g in net.outputs:
            w = output_name(g.name, wanted)
            if w is None:
                raise FluxcError(f"{files[n]}: net {n} has an unknown output {g.name!r} (expected {', '.join(wanted)})")
            ws = spec.outputs[wanted.index(w)]
            if g.dtype != ws.dtype or tuple(g.shape) != tuple(ws.shape):
                raise FluxcError(f"{files[n]}: net {n} output {g.name} is {g.dtype} {list(g.shape)}, the next net "
                                 f"takes {ws.dtype} {list(ws.shape)}; rebuild with fluxc compile")
        if len(net.outputs) != len(spec.outputs):
            raise FluxcError(f"{files[n]}: net {n} has {len(net.outputs)} outputs, the build has {len(spec.outputs)}")


class SailFlux:
    """The device-resident FLUX step on a set of opened SailEngines (one per file).

    Several image sizes (issue 11: a size-dependent net holds one stage per size): every size's
    tensors are allocated at open, one per role, chip and distinct shape (io_plan_sizes), and
    each call runs the stage its input shape selects, as bmruntime does: the transformer nets
    the stage of the latents' shape, the VAE decoder the stage of the unpacked latents' shape.
    `sizes`: the export at each of the build's sizes (Manifest.at), default [manifest]."""

    device_resident = True

    def __init__(self, models, manifest, sizes: list | None = None):
        views = list(sizes) if sizes else [manifest]
        d = manifest.dims
        self.dims = d
        self.engines = {}
        files = {}
        for eng in models.engines:
            for n in eng.nets:
                self.engines[n] = eng
                files[n] = eng.path.name
        per_size = []
        for v in views:
            specs = {s.net_name: s for s in v.specs}
            nets = {n: (stage_net(self.engines[n], n, specs[n]) if n in specs else self.engines[n].nets[n])
                    for n in self.engines}
            try:
                check_nets(nets, specs, files)
            except FluxcError as e:
                if len(views) == 1:
                    raise
                raise FluxcError(f"at {v.dims.width}x{v.dims.height}: {e}") from None
            per_size.append(nets)
        self.where = {n: self.engines[n].device_id for n in self.engines}
        self.plan, binds = io_plan_sizes(per_size, self.where, kinds_of({s.net_name: s for s in manifest.specs}))
        sail = models.engines[0].sail
        self.sail = sail
        handles = {}
        self.t: dict[tuple, object] = {}  # (device, role, shape) -> sail.Tensor
        for p in self.plan:  # the only device allocations of a run
            h = handles.setdefault(p.device, sail.Handle(p.device))
            dt = models.engines[0].sail_dtype(p.dtype)
            self.t[(p.device, p.role, p.shape)] = sail.Tensor(h, list(p.shape), dt, p.host, True)
        # per size: the tensors of each net, and (device, role) -> the tensor of that role at that size
        self.maps = [{n: ({i: self.t[k] for i, k in enumerate(ins)}, {i: self.t[k] for i, k in enumerate(outs)})
                      for n, (ins, outs) in b.items()} for b in binds]
        self.roles = [{(k[0], k[1]): self.t[k] for ins, outs in b.values() for k in ins + outs} for b in binds]
        self.feed_dtype = {(n, t.name): np.dtype(t.dtype) for v in views for n, s in
                           {s.net_name: s for s in v.specs}.items() for t in s.inputs}
        # the nets of each kind in pipeline order (fluxc.specs.KINDS): names are never formatted here
        self.kinds: dict[str, list[str]] = {}
        for s in manifest.specs:
            self.kinds.setdefault(s.kind, []).append(s.net_name)
        (self.head,), (self.tail,) = self.kinds["transformer_head"], self.kinds["transformer_tail"]
        self.doubles, self.singles = self.kinds.get("double_block", []), self.kinds.get("single_block", [])
        self.S, self.D = d.t5_len, d.inner_dim
        (self.vae,) = self.kinds.get("tiny_vae", []) + self.kinds.get("vae", [])
        self._size = 0  # the size of the current call (chosen by the input's shape)
        self._rotary_src: dict[int, object] = {}  # id of a rotary tensor -> the array written into it
        self.encoder = next(iter(self.kinds.get("vae_encoder", []) + self.kinds.get("tiny_vae_encoder", [])), None)

    # -- helpers
    def _t(self, dev: int, role: str):
        return self.roles[self._size][(dev, role)]

    def _has(self, dev: int, role: str) -> bool:
        return (dev, role) in self.roles[self._size]

    def _pick_size(self, net: str, role: str, shape) -> None:
        """Select the size (so the nets' stage) whose `role` tensor of `net`'s device has `shape`."""
        shape = tuple(int(x) for x in shape)
        dev = self.where[net]
        for i, r in enumerate(self.roles):
            t = r.get((dev, role))
            if t is not None and tuple(t.shape()) == shape:
                self._size = i
                return
        have = sorted({tuple(r[(dev, role)].shape()) for r in self.roles if (dev, role) in r})
        raise FluxcError(f"{net}: no stage takes {role} of shape {list(shape)} (this build's sizes take "
                         f"{', '.join(str(list(x)) for x in have)}); pick a size of the build")

    def _run(self, net: str) -> None:
        ins, outs = self.maps[self._size][net]
        rc = self.engines[net].engine.process(net, ins, outs)
        if rc not in (0, None):
            raise FluxcError(f"sophon.sail failed to run {net} on device {self.where[net]} (code {rc})")

    def _put(self, net: str, input_name: str, role: str, x: np.ndarray) -> None:
        t = self._t(self.where[net], role)
        t.update_data(np.ascontiguousarray(x, dtype=self.feed_dtype[(net, input_name)]).reshape(t.shape()))
        if t.own_sys_data():
            t.sync_s2d()

    def _get(self, dev: int, role: str) -> np.ndarray:
        t = self._t(dev, role)
        t.sync_d2s()
        return np.array(t.asnumpy(), dtype=np.float32).reshape(t.shape())

    def _copy(self, dst: tuple[int, str], src: tuple[int, str], off_src: int = 0, off_dst: int = 0,
              n: int | None = None) -> None:
        if dst == src and off_src == off_dst:
            return
        a, b = self._t(*dst), self._t(*src)
        if n is None:
            n = int(np.prod(b.shape()))
        a.sync_d2d(b, off_src, off_dst, n)

    def tensor_count(self) -> dict[int, int]:
        out: dict[int, int] = {}
        for p in self.plan:
            out[p.device] = out.get(p.device, 0) + 1
        return out

    # -- the pipeline's three calls
    def encode(self, clip_ids: np.ndarray, t5_ids: np.ndarray) -> None:
        self._size = 0  # the text encoders' tensors are the same at every size
        k = self.kinds
        (clip_head,), (clip_tail,), (t5_head,), (t5_tail,) = k["clip_head"], k["clip_tail"], k["t5_head"], k["t5_tail"]
        self._put(clip_head, "input_ids", "clip.ids", clip_ids)
        for net in [clip_head, *k.get("clip_block", []), clip_tail]:
            self._run(net)
        self._put(t5_head, "input_ids", "t5.ids", t5_ids)
        for net in [t5_head, *k.get("t5_block", []), t5_tail]:
            self._run(net)
        dh = self.where[self.head]
        self._copy((dh, "head.pooled") if self._has(dh, "head.pooled") else (dh, "clip.pooled"),
                   (self.where[clip_tail], "clip.pooled"))
        self._copy((dh, "head.t5") if self._has(dh, "head.t5") else (dh, "t5.hidden"),
                   (self.where[t5_tail], "t5.hidden"))

    def _write_rotary(self, rotary: np.ndarray) -> None:
        """The rotary table into this size's rotary tensors, unless they hold it already (written
        once per size; rewritten only when another size of the same shape used the tensor)."""
        for (dev, role), t in self.roles[self._size].items():
            if role == "rotary" and self._rotary_src.get(id(t)) is not rotary:
                t.update_data(np.ascontiguousarray(rotary, dtype=np.float32).reshape(t.shape()))
                if t.own_sys_data():
                    t.sync_s2d()
                self._rotary_src[id(t)] = rotary

    def transformer(self, latents: np.ndarray, t: float, guidance: float | None, rotary: np.ndarray) -> np.ndarray:
        h = self.head
        self._pick_size(h, "head.latents", latents.shape)
        self._write_rotary(rotary)
        self._put(h, "hidden_states", "head.latents", latents)
        self._put(h, "timestep", "head.timestep", np.array([t], np.float32))
        if self.dims.guidance_embeds:
            self._put(h, "guidance", "head.guidance", np.array([guidance * 1000.0], np.float32))
        self._run(h)
        dh = cur = self.where[h]
        temb_on = {dh}

        def need_temb(dev):
            if dev not in temb_on:
                self._copy((dev, "temb"), (dh, "temb"))
                temb_on.add(dev)

        for net in self.doubles:
            d = self.where[net]
            if d != cur:
                self._copy((d, "enc"), (cur, "enc"))
                self._copy((d, "hid"), (cur, "hid"))
                cur = d
            need_temb(d)
            self._run(net)
        N = int(latents.shape[1])  # image tokens at this size
        SD, ND = self.S * self.D, N * self.D
        state = "double"
        for net in self.singles:
            d = self.where[net]
            if state == "double":  # concatenate [text, image] into the single-stream tensor
                self._copy((d, "single"), (cur, "enc"), 0, 0, SD)
                self._copy((d, "single"), (cur, "hid"), 0, SD, ND)
                state = "single"
            elif d != cur:
                self._copy((d, "single"), (cur, "single"))
            cur = d
            need_temb(d)
            self._run(net)
        d = self.where[self.tail]
        if state == "single":  # the image part of the single-stream output
            self._copy((d, "hid"), (cur, "single"), SD, 0, ND)
        elif d != cur:
            self._copy((d, "hid"), (cur, "hid"))
        need_temb(d)
        self._run(self.tail)
        return self._get(d, "noise")

    def decode(self, latents: np.ndarray) -> np.ndarray:
        self._pick_size(self.vae, "vae.latents", latents.shape)
        self._put(self.vae, "latents", "vae.latents", latents)
        self._run(self.vae)
        return self._get(self.where[self.vae], "vae.image")

    def encode_image(self, image: np.ndarray) -> np.ndarray:
        self._pick_size(self.encoder, "enc.image", image.shape)
        self._put(self.encoder, "image", "enc.image", image)
        self._run(self.encoder)
        return self._get(self.where[self.encoder], "enc.out")

    def close(self) -> None:
        for t in self.t.values():
            free = getattr(t, "free", None)
            if free:
                free()
        self.t.clear()
