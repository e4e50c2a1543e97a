# Run integrity for v2a_iql.py and v2a_td3bc.py: --resume and --reuse-stages load only what the current flags would
# compute, a stopped run says how to continue it, and one process at a time writes into a run folder. Each stage's key
# (what determined its result, stored in its checkpoint), the checks of a run to resume and of the checkpoints it loads,
# the cut of its TensorBoard events, checkpoints written whole, and the run folder's creation and lock.
# docs: docs/v2a_iql.md ("Reading the code")
import fcntl
import glob
import io
import itertools
import json
import os
import shlex
import shutil
import signal
import sys
import threading
import time

import torch

from v2a_utils.errors import fail, no_space, one_line, why
from v2a_utils.flags import NEW_FLAG_DEFAULTS, REMOVED_FLAG_DEFAULTS, RESUME_FREE, sql_discount


# ---- What determined each stage's result (stored in its checkpoint, compared when loaded) ---------------------------
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


# ---- --resume and --reuse-stages load only what the current flags would compute ----------------------------------
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


def resume_command(script: str, run_dir: str) -> str:
    """The command that continues the run in run_dir, from the working directory it was started in."""
    prog = sys.argv[0] if os.path.basename(sys.argv[0]) == script else script  # as typed: another folder's script too
    return f"python {shlex.quote(prog)} --resume {shlex.quote(run_dir)}"


RESUME = {"command": None, "dir": None}  # the running run's folder and the command that continues it, once it has one


def stop_with_resume_command(command: str, run_dir: str):
    """From here on, Ctrl-C and SIGTERM (a scheduler's, kill's: by default a silent exit 143) raise a KeyboardInterrupt
    that carries the command continuing the run; the scripts' __main__ prints it as their one-line error. Every
    checkpoint written so far is intact (atomic saves). A full disk under TensorBoard's event writer becomes one line
    too (exit_in_one_line)."""
    def stop(signum, _frame):
        raise KeyboardInterrupt(f"{signal.Signals(signum).name}: stopped; continue the run with {command} (stage 5 "
                                f"restarts from its last evaluation, an unfinished earlier stage from its beginning)")
    for sig in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(sig) is not signal.SIG_IGN:  # a background job's ignored Ctrl-C stays ignored
            signal.signal(sig, stop)
    RESUME.update(command=command, dir=run_dir)
    # TensorBoard writes the event files from a thread of its own: a full disk there would print that thread's
    # traceback, and the main thread's next add_scalar raises the same error, which __main__ turns into one line
    default_hook = threading.excepthook
    threading.excepthook = lambda a: None if no_space(a.exc_value) else default_hook(a)


def exit_in_one_line(e: BaseException):
    """The training scripts' __main__: a stop (Ctrl-C, SIGTERM) or a full disk that no write of ours caught (in practice
    TensorBoard's event files; checkpoints, results.json and the run folder's first files say it themselves) ends the
    run in one line, without a traceback, naming the command that continues it; anything else is raised again."""
    if isinstance(e, KeyboardInterrupt):
        fail(str(e) or "interrupted before the run folder was made: nothing to continue; run the same command again")
    if not no_space(e):
        raise e
    if RESUME["dir"] is None:
        fail("no space left on device, before the run folder was made: make room and run the same command again")
    fail(f"no space left on device while writing {RESUME['dir']} (its TensorBoard event files); the checkpoints "
         f"written before are intact: make room, then continue the run with {RESUME['command']}")


# ---- Checkpoints and files, written whole ---------------------------------------------------------------------------
def save(obj: dict, path: str):
    """A checkpoint, replaced whole or not at all (write_whole: an interrupted save leaves the previous one intact).
    Serialised in memory first: torch.save into a full disk reports only 'unexpected pos ...', a file's write ENOSPC."""
    try:
        buf = io.BytesIO()
        torch.save(obj, buf)
        write_whole(path, buf.getbuffer())
    except (OSError, RuntimeError) as e:  # torch.save reports a file it cannot write as a RuntimeError
        fail(f"cannot write {path} ({why(e)}); the checkpoints written before are intact: make room or make "
             f"{os.path.dirname(path) or '.'} writable, then continue the run with --resume {os.path.dirname(path)}")


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
