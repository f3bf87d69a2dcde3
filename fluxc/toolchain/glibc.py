"""The glibc clash, and the fix that leaves the installed tpu_mlir untouched.

tpu_mlir's __init__ prepends tpu_mlir/lib/third_party to LD_LIBRARY_PATH for every tool it
launches, and that folder ships Ubuntu 22.04's glibc (libc.so.6, libm.so.6, libpthread.so.0;
glibc 2.35). On a host with a newer glibc (Debian 12: 2.36) every program started with that
path (tpuc-opt, /bin/sh, ...) then loads the old libc next to the host's newer ld.so and
crashes. Upstream's fix is to delete those files. We instead put the HOST's
libc/libm/libpthread in LD_PRELOAD: the loader then already has libraries with those sonames
and never loads the bundled copies, for the tool and for every child it spawns (tpu_mlir only
rewrites LD_LIBRARY_PATH, never LD_PRELOAD). The installed package stays untouched. This is
done only when the host glibc is at least as new as the bundled one: on an older host the
bundled glibc is what the binaries need, and tpu_mlir works as shipped.
"""
from __future__ import annotations

import functools
import os
import re
from pathlib import Path


def _glibc_version(text: bytes | str) -> tuple[int, int] | None:
    if isinstance(text, str):
        text = text.encode()
    m = re.search(rb"(?:release version|glibc) (\d+)\.(\d+)", text)
    return (int(m.group(1)), int(m.group(2))) if m else None


def _host_glibc_libs() -> list[str]:
    """Paths of this host's libc.so.6 / libm.so.6 / libpthread.so.0 (the ones this process
    itself runs with), or [] when that cannot be determined (non-glibc host)."""
    libdir = None
    try:
        for line in Path("/proc/self/maps").read_text().splitlines():
            path = line.split(None, 5)[-1] if line.count(" ") >= 5 else ""
            if path.endswith("/libc.so.6"):
                libdir = Path(path).parent
                break
    except OSError:
        return []
    if libdir is None:
        return []
    return [str(libdir / n) for n in ("libc.so.6", "libm.so.6", "libpthread.so.0") if (libdir / n).exists()]


@functools.lru_cache(maxsize=8)
def _needs_glibc_preload(tpuc_root: Path) -> bool:
    bundled = tpuc_root / "lib" / "third_party" / "libc.so.6"
    if not bundled.exists():
        return False
    try:
        host = _glibc_version(os.confstr("CS_GNU_LIBC_VERSION") or "")
    except (ValueError, OSError, AttributeError):
        host = None
    data = bundled.read_bytes()
    bundled_v = _glibc_version(data[data.find(b"GNU C Library"):][:200]) if b"GNU C Library" in data else None
    if host is None or bundled_v is None:
        return False
    return host >= bundled_v


def glibc_preload(tpuc_root: Path) -> str | None:
    """The LD_PRELOAD value for tools of the tpu_mlir package at `tpuc_root` (the host's glibc
    libraries ahead of any preload already set), or None when no preload is needed."""
    if not _needs_glibc_preload(tpuc_root):
        return None
    libs = _host_glibc_libs()
    if not libs:
        return None
    prev = os.environ.get("LD_PRELOAD")
    return " ".join(libs + ([prev] if prev else []))
