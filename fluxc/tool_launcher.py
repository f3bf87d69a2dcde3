"""Run one TPU-MLIR tool so that it cannot outlive the fluxc process that asked for it.

fluxc.toolchain.run_tool starts this file as a small standalone script (standard library only,
`python -I -S tool_launcher.py FD`), with the read end FD of a pipe whose write end only fluxc
holds. fluxc writes one JSON line {"argv": [...], "env": {...}} into the pipe and keeps it open
while the tool runs. This launcher:

- starts the tool in a new session, so the tool and everything it starts (tpu_mlir's entry
  points re-launch python, which runs tpuc-opt, ...) share one process group;
- waits for whichever comes first: the tool exits, or the pipe reaches end-of-file. EOF means
  fluxc is gone (kill -9 included: the kernel closes its descriptors) or gave up on the tool
  (timeout, Ctrl-C); the launcher then SIGKILLs the whole process group;
- when the tool exits by itself, SIGKILLs whatever it left behind in its group, then exits
  with the tool's exit code (128 + N for a tool killed by signal N);
- on SIGTERM/SIGHUP/SIGINT to the launcher itself, kills the group and exits.

Why a launcher instead of PR_SET_PDEATHSIG: a preexec_fn is unsafe in fluxc's multi-threaded
compile (fork in a threaded process), and PDEATHSIG reaches only the direct child, not the
tool's own children. This process is single-threaded; it never imports fluxc.
"""
import json
import os
import select
import signal
import subprocess
import sys


def _read_request(fd: int) -> dict:
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = os.read(fd, 65536)
        if not chunk:  # fluxc died before sending the command
            sys.exit(137)
        buf += chunk
    return json.loads(buf)


def main() -> int:
    fd = int(sys.argv[1])
    req = _read_request(fd)
    proc = subprocess.Popen(req["argv"], env=req["env"], start_new_session=True)
    group = proc.pid  # a new session's leader: its pid is the process group id

    def kill_group() -> None:
        try:
            os.killpg(group, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def on_signal(signum, _frame) -> None:
        kill_group()
        proc.wait()
        os._exit(128 + signum)

    for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(s, on_signal)

    try:
        pidfd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):  # Linux < 5.3 or Python < 3.9: poll instead
        pidfd = None
    watch = [fd] + ([pidfd] if pidfd is not None else [])
    while True:
        ready, _, _ = select.select(watch, [], [], None if pidfd is not None else 0.05)
        if fd in ready:
            if os.read(fd, 4096):  # fluxc never writes more; ignore stray bytes
                continue
            kill_group()  # EOF: fluxc is gone or gave up
            proc.wait()
            return 137
        # exited? (WNOWAIT: the tool stays a zombie, so its pid, the group id, is not reused
        # before the group is cleaned below)
        info = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        if info is not None and info.si_pid:
            kill_group()
            rc = proc.wait()
            return rc if rc >= 0 else 128 - rc


if __name__ == "__main__":
    sys.exit(main())
