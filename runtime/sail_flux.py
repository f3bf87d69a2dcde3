"""FLUX.1 on sophon.sail as the board runs it (and on the stand-in, runtime/sail_sim.py).

Device memory is held like sophon-demo's runtime holds it: one device tensor per role and
chip, shared by every net of a kind; a block's outputs are written over its inputs (the
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
"""
from __future__ import annotations

import numpy as np

from fluxc.errors import FluxcError
from fluxc.runtime.device_memory import PlannedTensor

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
    """The device tensors a FLUX build needs and, per net, the (device, role) of each of its
    inputs and outputs in the net's own order. `nets`: net name -> object with `.inputs` and
    `.outputs` (each with name, shape, dtype): the opened nets (runtime) or the build's piece
    specs (compile, verify). `where`: net -> device; `kinds`: net -> piece kind (`kinds_of`).
    Same-role tensors on one chip are one tensor; the nets must agree on its shape and dtype."""
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
                keys.append(key)
            sides.append(keys)
        binds[net] = (sides[0], sides[1])
    return list(tensors.values()), binds


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
    """The device-resident FLUX step on a set of opened SailEngines (one per file)."""

    device_resident = True

    def __init__(self, models, manifest):
        d = manifest.dims
        self.dims = d
        self.engines = {}
        files = {}
        nets = {}
        for eng in models.engines:
            for n, info in eng.nets.items():
                nets[n] = info
                self.engines[n] = eng
                files[n] = eng.path.name
        specs = {s.net_name: s for s in manifest.specs}
        check_nets(nets, specs, files)
        self.where = {n: self.engines[n].device_id for n in nets}
        self.plan, binds = io_plan(nets, self.where, kinds_of(specs))
        sail = models.engines[0].sail
        self.sail = sail
        handles = {}
        self.t: dict[tuple[int, str], object] = {}
        for p in self.plan:  # the only device allocations of a run
            h = handles.setdefault(p.device, sail.Handle(p.device))
            shape = list(p.shape)
            dt = models.engines[0].sail_dtype(p.dtype)
            self.t[(p.device, p.role)] = sail.Tensor(h, shape, dt, p.host, True)
        self.maps = {n: ({i: self.t[k] for i, k in enumerate(ins)}, {i: self.t[k] for i, k in enumerate(outs)})
                     for n, (ins, outs) in binds.items()}
        self.feed_dtype = {(n, t.name): np.dtype(t.dtype) for n, s in specs.items() for t in s.inputs}
        # the nets of each kind in pipeline order (fluxc.specs.KINDS): names are never formatted here
        self.kinds: dict[str, list[str]] = {}
        for s in manifest.specs:
            self.kinds.setdefault(s.kind, []).append(s.net_name)
        (self.head,), (self.tail,) = self.kinds["transformer_head"], self.kinds["transformer_tail"]
        self.doubles, self.singles = self.kinds.get("double_block", []), self.kinds.get("single_block", [])
        self.S, self.D, self.N = d.t5_len, d.inner_dim, d.hidden_tokens  # Kontext: image + reference tokens
        (self.vae,) = self.kinds.get("tiny_vae", []) + self.kinds.get("vae", [])
        self.encoder = next(iter(self.kinds.get("vae_encoder", []) + self.kinds.get("tiny_vae_encoder", [])), None)
        self._rotary_written = False

    # -- helpers
    def _run(self, net: str) -> None:
        ins, outs = self.maps[net]
        rc = self.engines[net].engine.process(net, ins, outs)
        if rc not in (0, None):
            raise FluxcError(f"sophon.sail failed to run {net} on device {self.where[net]} (code {rc})")

    def _put(self, net: str, input_name: str, role: str, x: np.ndarray) -> None:
        t = self.t[(self.where[net], role)]
        t.update_data(np.ascontiguousarray(x, dtype=self.feed_dtype[(net, input_name)]).reshape(t.shape()))
        if t.own_sys_data():
            t.sync_s2d()

    def _get(self, dev: int, role: str) -> np.ndarray:
        t = self.t[(dev, role)]
        t.sync_d2s()
        return np.array(t.asnumpy(), dtype=np.float32).reshape(t.shape())

    def _copy(self, dst: tuple[int, str], src: tuple[int, str], off_src: int = 0, off_dst: int = 0,
              n: int | None = None) -> None:
        if dst == src and off_src == off_dst:
            return
        a, b = self.t[dst], self.t[src]
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
        k = self.kinds
        (clip_head,), (clip_tail,), (t5_head,), (t5_tail,) = k["clip_head"], k["clip_tail"], k["t5_head"], k["t5_tail"]
        self._put(clip_head, "input_ids", "clip.ids", clip_ids)
        for net in [clip_head, *k.get("clip_block", []), clip_tail]:
            self._run(net)
        self._put(t5_head, "input_ids", "t5.ids", t5_ids)
        for net in [t5_head, *k.get("t5_block", []), t5_tail]:
            self._run(net)
        dh = self.where[self.head]
        self._copy((dh, "head.pooled") if (dh, "head.pooled") in self.t else (dh, "clip.pooled"),
                   (self.where[clip_tail], "clip.pooled"))
        self._copy((dh, "head.t5") if (dh, "head.t5") in self.t else (dh, "t5.hidden"),
                   (self.where[t5_tail], "t5.hidden"))

    def _write_rotary(self, rotary: np.ndarray) -> None:
        for (dev, role), t in self.t.items():
            if role == "rotary":
                t.update_data(np.ascontiguousarray(rotary, dtype=np.float32).reshape(t.shape()))
                if t.own_sys_data():
                    t.sync_s2d()
        self._rotary_written = True

    def transformer(self, latents: np.ndarray, t: float, guidance: float | None, rotary: np.ndarray) -> np.ndarray:
        if not self._rotary_written:
            self._write_rotary(rotary)
        h = self.head
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
        SD, ND = self.S * self.D, self.N * self.D
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
        self._put(self.vae, "latents", "vae.latents", latents)
        self._run(self.vae)
        return self._get(self.where[self.vae], "vae.image")

    def encode_image(self, image: np.ndarray) -> np.ndarray:
        self._put(self.encoder, "image", "enc.image", image)
        self._run(self.encoder)
        return self._get(self.where[self.encoder], "enc.out")

    def close(self) -> None:
        for t in self.t.values():
            free = getattr(t, "free", None)
            if free:
                free()
        self.t.clear()
