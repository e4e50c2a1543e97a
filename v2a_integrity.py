# Run integrity for v2a_iql.py and v2a_td3bc.py: --resume and --reuse-stages load only what the current flags would
# compute, and one process at a time writes into a run folder. Each stage's key (what determined its result, stored in
# its checkpoint), the checks of a run to resume and of the checkpoints it loads, the command line that takes a resumed
# run's own flags, the cut of its TensorBoard events, and the run folder's creation and lock. v2a_utils.py imports what
# the scripts call (utils.cli, utils.check_resume, utils.stage_keys) back from here; fail(), the one-line error of every
# check, lives here so that this module does not import v2a_utils.py.
# docs: docs/v2a_iql.md ("Reading the code")
import contextlib
import fcntl
import glob
import io
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import fields
from typing import Optional

import torch
import tyro

from data_gen import one_line
from data_gen_parent import no_space


def fail(msg: str):
    """One line on stderr, no traceback, prefixed with the program's name as argparse does."""
    raise SystemExit(f"{os.path.basename(sys.argv[0])}: error: {msg}")


# ---- Run integrity: --resume and --reuse-stages load only what the current flags would compute ----------------------
# flags added after runs were made: absent reads as this default
NEW_FLAG_DEFAULTS = {"dynamics_score": "contrastive", "dataset_constraint": 0.0, "vae_steps": 10_000,
                     "normalize_states": False, "reward_scale": "none", "awr_clip": 100.0, "actor_schedule": "cosine",
                     "sql_gamma": None, "sql_tau": None, "oracle": "none", "critic_layernorm": False,
                     "td_target_clip": False, "critic_grad_clip": 0.0}
REMOVED_FLAG_DEFAULTS = {"bf16": False}  # flags since removed: checkpoints made at their default stay valid
RESUME_FREE = ("exp_name", "track", "wandb_project_name", "wandb_entity", "generate", "log_freq", "resume",
               "reuse_stages", "bench", "compile", "threads", "total_steps",
               "final_eval_episodes", "filter_only")  # flags that do not change training (--total-steps may grow)


def sql_discount(args) -> tuple[float, float]:
    """Stage 3's discount and Polyak rate: --sql-gamma and --sql-tau, or the backbone's --gamma and --tau where unset
    (the release uses one value of each for both)."""
    return (args.gamma if args.sql_gamma is None else args.sql_gamma), (args.tau if args.sql_tau is None else args.sql_tau)


# ---- Run integrity: what determined each stage's result (stored in its checkpoint, compared when loaded) -----------
def stage_keys(args, records: dict, stages, script: str, constants: dict) -> dict:
    """Stage -> everything that determined its result: stored in its checkpoint, compared when it is loaded. A key
    holds those of the stages trained before it in the same run (they advance the RNG; stage 2's z feeds stage 3).
    Keys of stages 1-4 hold nothing script-specific: both scripts share those stages. `constants`: the script's
    constants per stage (1, 3, and "ot" for the OT score of stage 4)."""
    # a dataset's fingerprint, where it has one, is part of its key (other arrays, other results); its machine is not
    # (the fingerprint says it), and a dataset without one keys as before, so checkpoints made before both stay valid
    records = {i: {k: v for k, v in r.items() if k != "machine" and not (k == "fingerprint" and v is None)}
               for i, r in records.items()}
    src = dict(list(records.items())[:-1])  # the target dataset is the last
    sql_gamma, sql_tau = sql_discount(args)  # stored as gamma and tau: keys made before --sql-gamma stay valid
    own = {1: dict(data=src, repr_steps=args.repr_steps, z_dim=args.z_dim, lr=args.learning_rate, constants=constants[1]),
           2: {},
           3: dict(data=src, sql_steps=args.sql_steps, sql_alpha=args.sql_alpha, gamma=sql_gamma, tau=sql_tau,
                   lr=args.learning_rate, constants=constants[3]),
           4: dict(data=records, info_steps=args.info_steps, batch_size=args.batch_size, lr=args.learning_rate)
           if args.dynamics_score == "contrastive" else  # the OT score: a function of the data, the seed and these
           dict(data=records, score="ot", constants=constants["ot"])}
    keys, chain = {}, {"seed": args.seed}
    for k in stages:
        keys[k] = chain = {**chain, f"stage{k}": own[k]}
    flags = {k: v for k, v in vars(args).items()  # a newer flag at its default is left out: older keys stay valid
             if k not in RESUME_FREE and not (k in NEW_FLAG_DEFAULTS and NEW_FLAG_DEFAULTS[k] == v)}
    keys[5] = {**chain, "stage5": dict(data=records, script=script, flags=flags)}
    return {k: json.loads(json.dumps(key)) for k, key in keys.items()}  # as stored: lists, not tuples


def differences(old, new, prefix: str = "") -> list[str]:
    """'path old (now new)' for every leaf where two nested dicts differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for k in dict.fromkeys([*old, *new])
                for d in differences(old.get(k, "<absent>"), new.get(k, "<absent>"), f"{prefix}{k}.")]
    short = lambda x: "{...}" if isinstance(x, dict) else x if x == "<absent>" else repr(x)[:80]
    removed = prefix[:-1].rsplit(".", 1)[-1].lstrip("-").replace("-", "_")
    if new == "<absent>" and removed in REMOVED_FLAG_DEFAULTS and REMOVED_FLAG_DEFAULTS[removed] == old:
        return []
    return [] if old == new else [f"{prefix[:-1]} {short(old)} (now {short(new)})"]


def check_resume(args, script: str):
    """--resume: first the run folder's lock (nothing else may write into it from here on), then the run must be one of
    this script's, made with the same flags apart from RESUME_FREE and a larger --total-steps; it loads its stages 1-4
    from where it loaded them (its --reuse-stages)."""
    try:
        lock_run_folder(args.resume)
    except OSError as e:
        fail(f"cannot write the run folder {args.resume} ({why(e)}); make it writable, or copy it to a writable place "
             f"and --resume the copy")
    path = os.path.join(args.resume, "args.json")
    try:
        with open(path) as fh:
            old = json.load(fh)
    except (OSError, ValueError) as e:
        fail(f"--resume {args.resume}: cannot read {path} ({one_line(e)}); give a run directory made by {script}")
    made_by = old.get("script", f"{old.get('exp_name')}.py")
    if made_by != script:
        fail(f"--resume {args.resume}: that run was made by {made_by}; resume it with python {made_by} --resume ...")
    diff = [d for k, v in json.loads(json.dumps(vars(args))).items() if k not in RESUME_FREE
            for d in differences(old.get(k, NEW_FLAG_DEFAULTS.get(k, "<absent>")), v, f"--{k.replace('_', '-')}.")]
    if args.total_steps < old.get("total_steps", 0):
        diff.append(f"--total-steps {old['total_steps']} (now {args.total_steps}; it may only grow)")
    if diff:
        fail(f"--resume {args.resume} was made with other flags: {', '.join(diff)}; leave those flags out (--resume "
             f"alone continues the run with its own flags)")
    args.reuse_stages = old.get("reuse_stages")
    if args.reuse_stages and not os.path.isdir(args.reuse_stages):
        fail(f"--resume {args.resume} loads its stages 1-4 from {args.reuse_stages}, which is not a directory any more")


def cli(args_type, description: str, argv: Optional[list] = None):
    """The command line, as tyro.cli parses it, with two differences. A flag tyro rejects is one line, as every other
    error of the scripts (tyro draws a box). With --resume DIR, a flag not given takes that run's value (its args.json;
    NEW_FLAG_DEFAULTS' for a flag newer than the run), so that --resume DIR alone continues the run as it was made; a
    flag given with another value than the run's is then refused by check_resume, as before."""
    args = parse_flags(args_type, description, argv)
    if args.resume and (own := run_flags(args.resume, args_type)) is not None:
        args = parse_flags(args_type, description, argv, default=own)
    return args


def run_flags(run_dir: str, args_type):
    """The flags a run was made with, as an `args_type`; None where its args.json cannot be read (check_resume says
    why). args.json also holds what is not a flag (script, device, datasets, ...): left out. So are the flags that
    name other runs: check_resume takes the run's --reuse-stages itself."""
    try:
        with open(os.path.join(run_dir, "args.json")) as fh:
            old = json.load(fh)
        own = {f.name: old[f.name] if f.name in old else NEW_FLAG_DEFAULTS[f.name] for f in fields(args_type)
               if (f.name in old or f.name in NEW_FLAG_DEFAULTS) and f.name not in ("resume", "reuse_stages", "bench")}
        return args_type(**own)
    except (OSError, ValueError, TypeError, AttributeError):
        return None


def parse_flags(args_type, description: str, argv: Optional[list], **kwargs):
    """tyro.cli, with its complaints as one fail() line (flag_error)."""
    args, error = flag_error(args_type, argv, description=description, **kwargs)
    if error:
        fail(f"{error}; python {os.path.basename(sys.argv[0])} --help lists the flags")
    return args


def flag_error(args_type, argv: Optional[list], **kwargs) -> tuple:
    """(args, None) from tyro.cli, or (None, what is wrong in one line): the message of tyro's error box (and the flag
    it suggests for a misspelt one), for the command line or for an earlier value of a flag given more than once
    (earlier_values). --help, and a box it cannot read, exit as tyro does. benchmark.py checks every run of a sweep with
    it before it starts any."""
    given = sys.argv[1:] if argv is None else list(argv)
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            args = tyro.cli(args_type, args=given, **kwargs)
    except SystemExit as e:
        rows = [r.strip("│ ") for r in re.sub(r"\x1b\[[0-9;]*m", "", err.getvalue()).splitlines() if r.startswith("│")]
        cut = [i for i, r in enumerate(rows) if r and set(r) == {"─"}] + [len(rows)]  # the box's section rules
        message = " ".join(r for r in rows[: cut[0]] if r)
        if "Perhaps you meant:" in rows[cut[0]: cut[0] + 2] and len(rows) > cut[0] + 2:
            message += f" (perhaps {rows[cut[0] + 2].split()[0]})"
        if e.code and message:
            return None, message.rstrip(".")
        sys.stderr.write(err.getvalue())
        raise
    sys.stderr.write(err.getvalue())  # tyro's warnings, if it gave any
    for earlier in earlier_values(args_type, given):
        if error := flag_error(args_type, earlier)[1]:
            return None, error
    return args, None


def earlier_values(args_type, argv: list) -> list[list]:
    """Each value of a flag of `args_type` that `argv` gives before the flag's last one, as a command line of its own
    (`--total-steps abc`). The last value counts, as argparse takes it, so that a flag can be given again to override
    one before it; but tyro reads the last alone, and `--total-steps abc ... --total-steps 1000` would run: these are
    parsed too."""
    names, seen = {f.name.replace("_", "-") for f in fields(args_type)}, []
    for i, a in enumerate(argv):
        flag = a[2:].partition("=")[0].replace("_", "-")
        if a.startswith("--") and flag in names:
            seen.append((flag, argv[i: i + (1 if "=" in a or i + 1 == len(argv) or argv[i + 1].startswith("--") else 2)]))
    return [tokens for k, (flag, tokens) in enumerate(seen) if any(f == flag for f, _ in seen[k + 1:])]


def read_checkpoint(path: str, key: dict, dev: torch.device, hint: str) -> dict:
    try:
        ck = torch.load(path, map_location=dev, weights_only=False)
    except Exception as e:
        fail(f"{path} cannot be read ({one_line(e)}): it is truncated or corrupt; delete it to train its stage again")
    if not isinstance(ck, dict) or "key" not in ck:
        fail(f"{path} holds no stage key (an older version of this script wrote it): train its stage again")
    if diff := differences(ck["key"], key):
        fail(f"{path} was trained with other settings: {'; '.join(diff[:4])}{' ...' if len(diff) > 4 else ''}; {hint}")
    return ck


def load_checkpoints(args, stages, keys: dict, dev: torch.device) -> dict:
    """Stage -> (path, checkpoint) of what this run continues from, each read and checked against its key before
    anything is written: stages 1-5 of --resume (stages 1-4 also from the run it reused), stages 1-4 of --reuse-stages
    (all that the variant needs)."""
    cks, hints = {}, {args.resume: "resume with the datasets and flags it was made with (only --total-steps may grow)",
                      args.reuse_stages: "reuse a run of the same datasets, seed and stage settings"}
    find = lambda folder, k: folder and os.path.exists(os.path.join(folder, f"stage{k}.pt"))
    if args.reuse_stages and not args.resume and (absent := [k for k in stages if not find(args.reuse_stages, k)]):
        fail(f"--reuse-stages {args.reuse_stages} has no stage{absent[0]}.pt, which the {args.variant} variant needs")
    for k in (*stages, 5):
        if folder := next((f for f in (args.resume, args.reuse_stages if k <= 4 else None) if find(f, k)), None):
            path = os.path.join(folder, f"stage{k}.pt")
            cks[k] = path, read_checkpoint(path, keys[k], dev, hints[folder])
    return cks


STAGE_TAGS = ((0, "hyperparameters"), (1, "repr/rec_loss"), (1, "repr/kl"), (1, "repr/stage1_"), (2, "repr/domain_probe_acc"),
              (3, "losses/sql_"), (4, "losses/info_loss"), (4, "dynamics/"),
              (0, "filter/accuracy/"))  # tag prefix -> its stage; others: 5. Stage 0: logged anew by every process


def cut_events(run_dir: str, keep: dict):
    """--resume: drop from the run's TensorBoard event files what this process logs again (steps after stage 5's
    checkpoint, every step of a stage that runs again, the hyperparameter text), so each (tag, step) is logged once."""
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.summary.writer.record_writer import RecordWriter
    stage = lambda tag: next((k for k, prefix in STAGE_TAGS if tag.startswith(prefix)), 5)
    for path in glob.glob(os.path.join(run_dir, "events.out.tfevents.*")):
        records = list(RawEventFileLoader(path).Load())
        kept = [r for r, e in ((r, Event.FromString(r)) for r in records)
                if all(e.step <= keep[stage(v.tag)] for v in e.summary.value)]
        if len(kept) < len(records):
            buf = io.BytesIO()
            for r in kept:
                RecordWriter(buf).write(r)
            write_whole(path, buf.getvalue())


# ---- One writer per run folder ------------------------------------------------------------------------------------
RUN_LOCK = ".v2a-run.lock"  # in the run folder; it holds the pid of the process that holds (or last held) the lock
HELD: list = []  # the descriptor of this process's run lock, open until the process ends


def lock_run_folder(run_dir: str):
    """An exclusive OS lock (flock) on the run folder's lock file, taken before anything is written into the folder and
    held until this process ends: any exit releases it, kill -9 included, so no stale marker outlives a run. A second
    process that would write there (a second --resume of a running run) stops with one line naming the holder. One
    run per process: a lock this process still holds is that of a run that has ended in it (the tests call main()
    several times in one process). An OSError (a folder that cannot be written) is the caller's to report."""
    while HELD:
        os.close(HELD.pop())
    fd = os.open(os.path.join(run_dir, RUN_LOCK), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = ""
        for _ in range(20):  # the holder writes its pid right after it takes the lock
            if holder := os.pread(fd, 32, 0).decode(errors="replace").strip():
                break
            time.sleep(0.05)
        os.close(fd)
        fail(f"{run_dir} is in use by another process (pid {holder or '?'}), which writes into it: one process at a time "
             f"may. Wait for it to end, or stop it (kill {holder or '<pid>'}) and run this command again")
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except OSError:
        os.close(fd)
        raise
    HELD.append(fd)


def new_run_folder(path: str) -> str:
    """Makes the run folder `path` (runs/<env>__<exp>__<row>__<seed>__<time>) for this process alone, and locks it:
    os.mkdir fails where the folder exists, so a run started in the same second as another (with any flags) gets
    `path`-2 (then -3, ...) instead of sharing its folder. Returns the folder made."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    for k in itertools.count(1):
        folder = path if k == 1 else f"{path}-{k}"
        try:
            os.mkdir(folder)
        except FileExistsError:
            continue
        try:
            lock_run_folder(folder)
        except OSError:  # the lock file cannot be written (a full disk): the folder, empty, goes with the error
            shutil.rmtree(folder, ignore_errors=True)
            raise
        return folder


def write_whole(path: str, data):
    """Writes `data` (str or bytes) to path + '.tmp', then renames it onto `path`: a file is replaced whole or not at
    all. A failed write (a full disk) removes the .tmp, which would otherwise hold the space it took, and raises."""
    try:
        with open(path + ".tmp", "w" if isinstance(data, str) else "wb") as fh:
            fh.write(data)
        os.replace(path + ".tmp", path)
    except OSError:
        if os.path.exists(path + ".tmp"):
            os.remove(path + ".tmp")
        raise


def why(e: BaseException) -> str:
    """A failed write's reason for a one-line error: 'no space left on device' for a full disk, which h5py and torch
    report in other words (torch.save: 'unexpected pos'), else the error itself."""
    return "no space left on device" if no_space(e) else one_line(e)


def code_version(folder: str) -> Optional[str]:
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
