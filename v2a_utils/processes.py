# The tie of a data_gen.py process to the program that started it (docs/data_gen.md, "Started by a training script"):
# data_gen.py reads its parent first thing at import (parent_now, before its slower imports) and, run as a script, calls
# tie_to_parent, so that a training script killed by SIGKILL leaves no data_gen.py behind; and what a parent does
# when its data_gen.py failed: remove what it left (remove_stale, which data_gen.py also runs at its start) and say why
# in one line (child_error). Standard library only: data_gen.py imports it before anything else, and the shifted envs'
# entry point imports data_gen.py. pid_alive also serves benchmark.py's run locks.
import ctypes
import os
import re
import shutil
import signal
import sys

from v2a_utils.errors import no_space


def parent_now() -> tuple[int, str]:
    """(pid, executable) of the parent; executable '' where it cannot be read (/proc of another user, PID 1 in a
    container, no /proc): importing data_gen must never fail for it (the shifted envs' entry point imports it)."""
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


# ---- After a data_gen.py that died: what it left, and what its parent says ---------------------------------------------
def datasets_root() -> str:
    """Minari's datasets root ($MINARI_DATASETS_PATH, default ~/.minari/datasets), without creating it (Minari's
    own `get_dataset_path` creates it, which fails with a traceback where it cannot)."""
    path = os.environ.get("MINARI_DATASETS_PATH")
    if path is None:
        path = os.path.join(os.path.expanduser("~"), ".minari", "datasets")
    return os.path.abspath(path)


def staging_dir(root: str, pid: int) -> str:
    """The staging folder of data_gen.py process `pid` writing to the datasets folder `root`: beside it, on the same
    disk, so that a finished dataset moves under its final id in one rename."""
    return f"{root}-staging-{pid}"


def probe_path(root: str, pid: int) -> str:
    """The file that data_gen.py process `pid` writes and removes to learn whether `root` can be written."""
    return os.path.join(root, f".v2a-write-probe-{pid}")


def remove_stale(root: str) -> list[str]:
    """Remove the staging folders and write probes of data_gen.py processes that are gone (killed, crashed): what a
    dead writer left on a full disk would keep it full, and refuse every later start. Returns what it removed."""
    parent, base = os.path.split(root)
    stale = []
    for folder, pattern in ((parent, re.escape(base) + r"-staging-(\d+)"), (root, r"\.v2a-write-probe-(\d+)")):
        names = os.listdir(folder) if os.path.isdir(folder) else []
        stale += [os.path.join(folder, n) for n in sorted(names) if (m := re.fullmatch(pattern, n))
                  and (int(m.group(1)) == os.getpid() or not pid_alive(int(m.group(1))))]
    for path in stale:
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        elif os.path.exists(path):
            os.remove(path)
    return stale


def child_error(returncode: int, stderr: str, root: str) -> tuple[str, str]:
    """A failed data_gen.py child as its parent (a training script, benchmark.py) reports it: (one line, what to print
    before it). Its own one-line error where it gave one; a full disk (a crash inside h5py, a segfault, gives no such
    line) as one line too, after removing what the child left; any other crash with its output, which the user needs."""
    errors = [line for line in stderr.splitlines() if line.startswith("data_gen.py: error: ")]
    if errors:
        return errors[-1], ""
    if no_space(Exception(stderr)):
        remove_stale(root)
        return (f"data_gen.py: error: no space left on device under {root} (data_gen.py stopped with status "
                f"{returncode}; what it had written is removed): make room there, or set MINARI_DATASETS_PATH to a folder "
                f"on a disk with room"), ""
    return f"data_gen.py exited with status {returncode}", stderr
