# The tie of a data_gen.py process to the program that started it (docs/data_gen.md, "Started by a training script"):
# data_gen.py reads its parent first thing at import (parent_now, before its slower imports) and, run as a script, calls
# tie_to_parent, so that a training script killed by SIGKILL leaves no data_gen.py behind. Standard library only: the
# training scripts and the shifted envs' entry point import data_gen, and this with it. pid_alive also serves
# benchmark.py's run locks.
import ctypes
import os
import signal
import sys


def parent_now() -> tuple[int, str]:
    """(pid, executable) of the parent; executable '' where it cannot be read (/proc of another user, PID 1 in a
    container, no /proc): importing data_gen must never fail for it (the training scripts import it)."""
    ppid = os.getppid()
    try:
        return ppid, os.path.realpath(f"/proc/{ppid}/exe", strict=True)
    except OSError:
        return ppid, ""


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def tie_to_parent(parent_pid: int, parent_exe: str) -> bool:
    """Started by a program running this same Python (a training script's run_data_gen, benchmark.py, a test), stop
    when it dies, even by SIGKILL: Linux sends this process SIGTERM then (prctl PR_SET_PDEATHSIG), whose handler
    removes the staging folder. A parent that is something else, a shell say, is not followed, so that `nohup python
    data_gen.py &` outlives its shell. Not on other systems (docs/data_gen.md). Returns whether it is tied."""
    if not sys.platform.startswith("linux") or parent_exe != os.path.realpath(sys.executable):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        return False
    if os.getppid() != parent_pid:  # the parent died before prctl (its signal came too early): stop now
        os.kill(os.getpid(), signal.SIGTERM)
    return True


def pid_alive(pid: int) -> bool:
    """Whether process `pid` runs: a staging folder's (data_gen.py) or a run lock's (benchmark.py) owner."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a killed process that nobody has reaped yet (a zombie) answers the signal too
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True
