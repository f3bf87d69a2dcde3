"""The patcher: reversible, recorded, version-aware attribute swaps on loaded modules.

A patch never edits a file: it sets an attribute on one module *instance* (its `forward`,
or a FluxAttention's `processor`) and records the previous state so `restore()` puts it
back exactly (an instance attribute that did not exist before is deleted again).

Each patch was written against one library version (WRITTEN_FOR). Before touching a
module it checks the installed version; when the version differs it still applies if the
module's structure is what the patch expects (tolerant mode, a warning is emitted), and
raises FluxcError naming the module otherwise, or always in strict mode.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Callable

from fluxc.errors import FluxcError

# Versions each family of patches was written and tested for (prefix match on the
# installed version string).
WRITTEN_FOR: dict[str, str] = {"diffusers": "0.42.", "transformers": "5."}
PIN_HINT: dict[str, str] = {"diffusers": "diffusers==0.42.1", "transformers": "transformers>=5,<6"}

_MISSING = object()


def installed_version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


@dataclass
class _Undo:
    obj: Any
    name: str
    old: Any  # _MISSING when the attribute was not set on the instance itself
    what: str


@dataclass
class Patcher:
    """Records every swap it makes and undoes them in reverse order.

    Use as a context manager (`with Patcher() as p: p.apply(module)`) or call
    `restore()` yourself. `versions` overrides the detected package versions (tests);
    `strict=True` refuses any version other than the one a patch was written for.
    """

    strict: bool = False
    versions: dict[str, str] = field(default_factory=dict)
    _undo: list[_Undo] = field(default_factory=list)
    _warned: set = field(default_factory=set)
    where: str = ""  # path of the root being patched, for messages (set by apply)

    # -- bookkeeping -------------------------------------------------------------------
    def set_attr(self, obj: Any, name: str, value: Any, what: str) -> None:
        old = obj.__dict__[name] if name in obj.__dict__ else _MISSING
        self._undo.append(_Undo(obj, name, old, what))
        object.__setattr__(obj, name, value)

    @property
    def applied(self) -> list[str]:
        """Human-readable list of what is currently patched."""
        return [u.what for u in self._undo]

    def restore(self) -> None:
        while self._undo:
            u = self._undo.pop()
            if u.old is _MISSING:
                try:
                    object.__delattr__(u.obj, u.name)
                except AttributeError:
                    pass
            else:
                object.__setattr__(u.obj, u.name, u.old)

    def __enter__(self) -> "Patcher":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.restore()

    # -- version checks ----------------------------------------------------------------
    def version_of(self, package: str) -> str:
        return self.versions.get(package) or installed_version(package)

    def check(self, package: str, patch: str, where: str, structure_problem: str | None) -> None:
        """Allow patch `patch` on module `where` (a qualified class name + path) or raise.

        structure_problem: None when the module looks exactly as the patch expects,
        else a short description of what differs.
        """
        v = self.version_of(package)
        want = WRITTEN_FOR[package]
        version_ok = v.startswith(want)
        if version_ok and structure_problem is None:
            return
        if not version_ok and structure_problem is None and not self.strict:
            key = (package, patch)
            if key not in self._warned:
                self._warned.add(key)
                warnings.warn(f"fluxc patch '{patch}' was written for {package} {want}x, found {v}; "
                              f"the module structure matches, applying it anyway", stacklevel=3)
            return
        reason = structure_problem or f"this patch was written for {package} {want}x"
        raise FluxcError(
            f"cannot apply fluxc patch '{patch}' to {where} with {package} {v}: {reason}; "
            f"fix: pip install '{PIN_HINT[package]}'"
        )

    # -- convenience -------------------------------------------------------------------
    def apply(self, root: Any, patches: tuple[str, ...] | None = None, where: str = "") -> "Patcher":
        """Apply the export patches (default: all) to every matching submodule of root.
        `where` names root in messages (e.g. "transformer_blocks.3")."""
        from . import ALL_PATCHES

        names = patches or tuple(ALL_PATCHES)
        for name in names:
            if name not in ALL_PATCHES:
                raise FluxcError(f"unknown fluxc patch {name!r}; use one of {sorted(ALL_PATCHES)}")
        old, self.where = self.where, where
        try:
            for name in names:
                ALL_PATCHES[name](self, root)
        finally:
            self.where = old
        return self


def qualname(obj: Any) -> str:
    t = type(obj)
    return f"{t.__module__}.{t.__qualname__}"


def named_instances(root: Any, predicate: Callable[[Any], bool], where: str = ""):
    """(path, module) for root and every submodule matching predicate; paths are prefixed
    with `where` (the root's own path) when given."""
    for path, mod in root.named_modules():
        if predicate(mod):
            full = ".".join(x for x in (where, path) if x)
            yield full or "<root>", mod
