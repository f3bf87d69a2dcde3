"""Compile recipes: which quantisation and TPU-MLIR options each piece group gets.

A recipe is a small YAML file (recipes/bm1684x.yaml is the default, shipped in the
fluxc.recipes package). `load_recipe` validates it and names the bad key on error;
`piece_plan` turns it into the exact option set of one piece, which is also part of
that piece's cache key.
"""
from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from fluxc.compile.chips import CHIPS  # the supported chips (fluxc/compile/chips.py)
from fluxc.errors import FluxcError
from fluxc.specs import GROUPS, PieceSpec

# model_transform's simplification off (its flag is parsed with type=bool: only "" is false):
# fluxc.compile.fold has simplified the graph already
FOLD_TRANSFORM_ARGS = ["--do_onnx_sim", ""]

QUANTIZE_CLI = ("BF16", "W4BF16")  # what `--quantize` accepts (transformer blocks)
QUANTIZE_ANY = ("F16", "BF16", "W4BF16", "W4F16")

_BOOL_KEYS = ("q_symmetric", "quant_input", "quant_output", "high_precision")
_GROUP_KEYS = ("quantize", "q_group_size", "opt", "compress_mode", "f32_inputs", "transform_args",
               "deploy_args") + _BOOL_KEYS
_TOP_KEYS = ("chip", "groups", "thresholds")


@dataclass(frozen=True)
class Recipe:
    source: str
    chip: str
    groups: dict[str, dict[str, Any]]
    thresholds: dict[str, tuple[float, float]]


def default_recipe_path(chip: str = "bm1684x") -> Path:
    return Path(str(resources.files("fluxc.recipes").joinpath(f"{chip}.yaml")))


def load_recipe(path: Path | None = None, chip: str = "bm1684x") -> Recipe:
    p = Path(path) if path is not None else default_recipe_path(chip)
    if not p.is_file():
        raise FluxcError(f"recipe {p} not found; pass an existing YAML file to --recipe")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        line = getattr(getattr(e, "problem_mark", None), "line", None)
        where = f" (line {line + 1})" if line is not None else ""
        raise FluxcError(f"recipe {p} is not valid YAML{where}; fix the file") from None
    return validate_recipe(data, str(p))


def _bad(src: str, key: str, why: str) -> FluxcError:
    return FluxcError(f"recipe {src}: bad key '{key}': {why}")


def validate_recipe(data: Any, src: str = "<recipe>") -> Recipe:
    if not isinstance(data, dict):
        raise FluxcError(f"recipe {src}: expected a mapping with keys {', '.join(_TOP_KEYS)}")
    for k in data:
        if k not in _TOP_KEYS:
            raise _bad(src, str(k), f"unknown; allowed: {', '.join(_TOP_KEYS)}")
    chip = str(data.get("chip", "bm1684x")).lower()
    if chip not in CHIPS:
        raise _bad(src, "chip", f"{chip!r} is not supported; use one of {', '.join(CHIPS)}")
    groups_in = data.get("groups")
    if not isinstance(groups_in, dict):
        raise _bad(src, "groups", "must be a mapping from piece group to options")
    groups: dict[str, dict[str, Any]] = {}
    for g, opts in groups_in.items():
        if g not in GROUPS:
            raise _bad(src, f"groups.{g}", f"unknown group; groups are {', '.join(GROUPS)}")
        if not isinstance(opts, dict):
            raise _bad(src, f"groups.{g}", "must be a mapping of options")
        clean: dict[str, Any] = {}
        for k, v in opts.items():
            key = f"groups.{g}.{k}"
            if k not in _GROUP_KEYS:
                raise _bad(src, key, f"unknown option; allowed: {', '.join(_GROUP_KEYS)}")
            if k == "quantize":
                q = str(v)
                if q.lower() == "cli":
                    q = "cli"
                elif q.upper() in QUANTIZE_ANY:
                    q = q.upper()
                else:
                    raise _bad(src, key, f"{v!r} is not one of {', '.join(QUANTIZE_ANY)}, cli")
                clean[k] = q
            elif k in _BOOL_KEYS:
                if not isinstance(v, bool):
                    raise _bad(src, key, "must be true or false")
                clean[k] = v
            elif k == "q_group_size":
                if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                    raise _bad(src, key, "must be a non-negative integer")
                clean[k] = v
            elif k == "opt":
                if v not in (1, 2, 3):
                    raise _bad(src, key, "must be 1, 2 or 3")
                clean[k] = v
            elif k == "compress_mode":
                if v not in ("none", "weight", "activation", "all"):
                    raise _bad(src, key, "must be none, weight, activation or all")
                clean[k] = v
            elif k == "f32_inputs":
                if not isinstance(v, list) or not all(isinstance(a, str) for a in v):
                    raise _bad(src, key, "must be a list of input names")
                clean[k] = list(v)
            else:  # transform_args / deploy_args
                if not isinstance(v, list) or not all(isinstance(a, (str, int, float)) for a in v):
                    raise _bad(src, key, "must be a list of strings")
                clean[k] = [str(a) for a in v]
        if "quantize" not in clean:
            raise _bad(src, f"groups.{g}.quantize", "missing")
        groups[g] = clean
    missing = [g for g in GROUPS if g not in groups]
    if missing:
        raise _bad(src, f"groups.{missing[0]}", "missing; every group needs an entry")
    thr_in = data.get("thresholds", {})
    if not isinstance(thr_in, dict):
        raise _bad(src, "thresholds", "must map a quantisation to [cosine, euclidean]")
    thresholds: dict[str, tuple[float, float]] = {}
    for q, v in thr_in.items():
        key = f"thresholds.{q}"
        if str(q).upper() not in QUANTIZE_ANY:
            raise _bad(src, key, f"unknown quantisation; use one of {', '.join(QUANTIZE_ANY)}")
        if (not isinstance(v, list) or len(v) != 2
                or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and 0 <= x <= 1 for x in v)):
            raise _bad(src, key, "must be [cosine, euclidean], two numbers in 0..1")
        thresholds[str(q).upper()] = (float(v[0]), float(v[1]))
    used = {o["quantize"] for o in groups.values()} - {"cli"}
    for q in sorted(used | ({"BF16", "W4BF16"} if any(o["quantize"] == "cli" for o in groups.values()) else set())):
        if q not in thresholds:
            raise _bad(src, f"thresholds.{q}", "missing; every quantisation used needs a threshold")
    return Recipe(src, chip, groups, thresholds)


@dataclass(frozen=True)
class PiecePlan:
    """Everything that decides how one piece is compiled (hashed into its cache key)."""

    quantize: str
    options: dict[str, Any]  # recipe options of the group, without `quantize`
    tolerance: tuple[float, float]


def piece_plan(recipe: Recipe, spec: PieceSpec, cli_quantize: str) -> PiecePlan:
    opts = dict(recipe.groups[spec.group])
    q = opts.pop("quantize")
    if q == "cli":
        q = cli_quantize
    if not q.startswith("W4"):
        # group size / symmetry mean nothing without int4 weights: keep them out of the
        # options (and the cache key) so a BF16 piece does not recompile over them.
        opts.pop("q_group_size", None)
        opts.pop("q_symmetric", None)
    return PiecePlan(q, opts, recipe.thresholds[q])


def transform_args(spec: PieceSpec, plan: PiecePlan, folded: bool = True) -> list[str]:
    """model_transform arguments besides names and test files; folded=False: for the exported
    piece itself, with model_transform's own simplification (what the tests compare against)."""
    shapes = "[" + ",".join("[" + ",".join(str(x) for x in t.shape) + "]" for t in spec.inputs) + "]"
    args = ["--input_shapes", shapes]
    if any(t.dtype != "float32" for t in spec.inputs):
        args += ["--input_types", ",".join(t.dtype for t in spec.inputs)]
    args += list(plan.options.get("transform_args", []))
    # the graph is simplified before model_transform (fluxc.compile.fold): its own step off
    return args + (FOLD_TRANSFORM_ARGS if folded else [])


def deploy_args(plan: PiecePlan, chip: str) -> list[str]:
    """model_deploy arguments besides file names and test files."""
    o = plan.options
    args = ["--quantize", plan.quantize, "--chip", chip]
    if plan.quantize.startswith("W4"):
        if "q_group_size" in o:
            args += ["--q_group_size", str(o["q_group_size"])]
        if o.get("q_symmetric"):
            args.append("--q_symmetric")
    if o.get("quant_input"):
        args.append("--quant_input")
    if o.get("quant_output"):
        args.append("--quant_output")
    if o.get("high_precision"):
        args.append("--high_precision")
    if "opt" in o:
        args += ["--opt", str(o["opt"])]
    if "compress_mode" in o:
        args += ["--compress_mode", o["compress_mode"]]
    args += list(o.get("deploy_args", []))
    return args
