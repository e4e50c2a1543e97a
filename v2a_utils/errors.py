# Every problem a user can mend is one line, without a traceback: `fail` in the training scripts (their program's name,
# as argparse prints it), DataGenError in data_gen.py and the helpers it calls (its __main__ prints it), and the words
# a failed write or a caught exception takes in such a line. Standard library only: data_gen.py imports it, and must
# load the shifted envs without torch.
import errno
import os
import sys


class DataGenError(Exception):
    """A problem with the user's input: printed as one line, without a traceback."""


def fail(msg: str):
    """One line on stderr, no traceback, prefixed with the program's name as argparse does."""
    raise SystemExit(f"{os.path.basename(sys.argv[0])}: error: {msg}")


def one_line(e: BaseException) -> str:
    return " ".join(f"{type(e).__name__}: {e}".split())[:300]


def no_space(e: BaseException) -> bool:
    """Whether `e` is a full disk: errno 28 (ENOSPC), or the text of it that h5py's and data_gen.py's own errors carry."""
    return getattr(e, "errno", None) == errno.ENOSPC or any(s in str(e) for s in ("errno = 28", "No space left on device",
                                                                                 "no space left on device"))


def why(e: BaseException) -> str:
    """A failed write's reason for a one-line error: 'no space left on device' for a full disk, which h5py and torch
    report in other words (torch.save: 'unexpected pos'), else the error itself."""
    return "no space left on device" if no_space(e) else one_line(e)
