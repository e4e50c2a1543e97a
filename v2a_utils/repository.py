# The repository around this package: its folder (the scripts, policies/ and docs/ stand there, beside v2a_utils/) and
# the commit of its code, recorded with every run.
import os
import subprocess
from typing import Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def code_version(folder: str = ROOT) -> Optional[str]:
    """The git commit of the training scripts' folder, "+modified" if tracked code differs from it (None: not a git
    work tree): recorded with every attempt, so that each exported number names the code that made it. The exports
    (results/), the pages (docs/) and other Markdown are not code: a running sweep rewrites them."""
    not_code = [":(exclude)results", ":(exclude)docs", ":(exclude)*.md"]
    try:
        git = lambda *a: subprocess.run(["git", "-C", folder, *a], capture_output=True, text=True, check=True).stdout
        changed = git("status", "--porcelain", "-uno", "--", ".", *not_code).strip()
        return git("rev-parse", "HEAD").strip() + ("+modified" if changed else "")
    except (OSError, subprocess.CalledProcessError):
        return None
