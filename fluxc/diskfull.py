"""One message for a full disk (OSError ENOSPC), wherever fluxc meets it: the CLI top level,
the tool runner, the Hub download."""
from __future__ import annotations

import errno
import io
import os
import re
import shutil
from pathlib import Path
from types import TracebackType

from fluxc.errors import FluxcError

# A tool that failed with less than this free on its disk is taken to have filled it.
LOW_FREE_BYTES = 64 << 20


def is_disk_full(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)


def free_bytes(path: Path | str) -> int | None:
    """Free bytes on the filesystem holding `path` (or its nearest existing parent)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def disk_full_error(what: str, where: Path | str | None, option: str = "--out/--build-dir") -> FluxcError:
    free = free_bytes(where) if where is not None else None
    left = "" if free is None else (f" ({free / 1e9:.1f} GB left there)" if free >= 1e9 else
                                    f" ({free / 1e6:.1f} MB left there)")
    return FluxcError(f"disk full while writing {what}{left}: free some GB on that disk or choose another "
                      f"{option}; nothing half-written is kept")


def file_being_written(tb: TracebackType | None) -> str | None:
    """The innermost open, writable file object in the traceback's frames (a plain write()
    raising ENOSPC names no file)."""
    found = None
    while tb is not None:
        for v in list(tb.tb_frame.f_locals.values()):
            if isinstance(v, io.IOBase):  # often already closed by its `with` block: look at the mode
                name, mode = getattr(v, "name", None), str(getattr(v, "mode", ""))
                if isinstance(name, (str, bytes)) and any(c in mode for c in "wax+"):
                    found = os.fsdecode(name)
        tb = tb.tb_next
    return found


# The option that moves each command's output elsewhere.
OUTPUT_OPTIONS = {"export": "--out", "compile": "--build-dir/--out", "tiny": "OUT folder", "verify": "--out",
                  "run": "--out"}


def final_name(path: str) -> str:
    """The name a temporary file would have been renamed to (.X.tmp-PID -> X; a piece staged in
    .P.export-PID/staged/ -> its export folder)."""
    path = re.sub(r"/\.[^/]+\.export-\d+/staged/", "/", path)
    return re.sub(r"/\.([^/]+)\.tmp-\d+$", r"/\1", path)


def from_oserror(e: OSError, command: str | None = None) -> FluxcError:
    """The disk-full FluxcError for an ENOSPC OSError caught anywhere above the write."""
    # a two-path operation (copy, link, rename) names its destination second
    path = e.filename2 or e.filename or file_being_written(e.__traceback__)
    return disk_full_error(final_name(os.fsdecode(path)) if path else "the output", path,
                           OUTPUT_OPTIONS.get(command or "", "--out/--build-dir"))
