"""What this machine offers a build: memory available now and the CPUs this process may use."""
from __future__ import annotations

import os
from pathlib import Path


def mem_available() -> int:
    """MemAvailable from /proc/meminfo in bytes (4 GiB when it cannot be read)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 << 30


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1
