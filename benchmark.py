# Sweep runner and results report for the V2A training scripts (docs/benchmark.md).
#   python benchmark.py run --sweep hopper --variants v2a dvdf igdf merged target --seeds 1 2 3 4 5 -- --total-steps 300000
#   python benchmark.py report --sweep hopper        # -> docs/results.md, docs/results/*.png
# A run is one process of a training script with one CPU thread (or one GPU), in its own folder runs/<sweep>/<run name>/;
# the training script is started there, so its run directory is runs/<sweep>/<run name>/runs/<env>__...__<time>/.
# Re-launching skips finished runs and continues unfinished ones with the script's --resume. The training scripts do not
# import ray, rliable or matplotlib; this file imports ray only with --ray-address, and rliable/matplotlib only in report.
import csv
import glob
import itertools
import json
import os
import platform
import shlex
import signal
import socket
import subprocess
import sys
import time
import warnings
import zlib
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import tyro

ROOT = os.path.dirname(os.path.abspath(__file__))
VARIANTS = ["v2a", "dvdf", "igdf", "merged", "target"]
RANKING = ["v2a", "dvdf", "igdf", "merged"]  # the paper's claim, best first
BASELINE = "target"  # target data only: V2A must beat it for the source data to have helped at all
PAPER_GAIN = {"dvdf": 13.7, "igdf": 21.4}  # the paper's relative improvement of V2A over these baselines, %
TASK_FLAGS = ("env_id", "target_size", "source", "source_size")  # with the script: what makes a task (not a method)
DATA_FLAGS = ("env-id", "source", "source-size", "target-size")  # the flags that name the datasets (data_gen.py)
LOCK_STALE_S = 300  # a run's lock is refreshed every minute while it runs; older than this, its runner died


@dataclass
class Run:
    """Run a grid of script x variant x seed (x --grid flags) as independent processes; skip finished runs, resume
    unfinished ones. Flags after `--` go to every run."""
    sweep: str = "default"
    """the sweep's name: runs go to runs/<sweep>/, their small exports to results/<sweep>/"""
    scripts: list[str] = field(default_factory=lambda: ["v2a_iql"])
    """training scripts: a name next to this file (v2a_iql, v2a_td3bc) or a path"""
    variants: list[str] = field(default_factory=lambda: list(VARIANTS))
    """values of the scripts' --variant"""
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3, 4, 5])
    """values of the scripts' --seed"""
    grid: list[str] = field(default_factory=list)
    """more grid axes, `flag=v1,v2` each (flag as the script spells it, without --), e.g. target-size=5000,100000;
    a boolean flag takes true,false (e.g. normalize-states=false,true: --no-normalize-states / --normalize-states)"""
    workers: int = os.cpu_count() or 1
    """local pool: runs at the same time (one CPU thread each); with --ray-address local, the CPUs of the local Ray"""
    ray_address: Optional[str] = None
    """submit the runs as Ray tasks: `auto` (the cluster this machine belongs to), `local` (start Ray here) or host:port"""
    gpus_per_run: float = 0.0
    """Ray only: GPUs of each run's task (0: a CPU task, num_cpus=1)"""
    data_gen: bool = True
    """first run data_gen.py once per distinct dataset (it reuses existing ones), so parallel runs never generate the
    same datasets at once; only for scripts with a data_gen.py next to them"""
    export: bool = True
    """after each run, export its small files to results/<sweep>/<run name>/ (see `report`)"""
    dry_run: bool = False
    """print each run's state (done / resume / new / running) and command, start nothing"""
    runs_root: str = "runs"
    """where sweep folders go"""
    results_root: str = "results"
    """where the exports go (committed)"""
    progress_every: float = 60.0
    """seconds between progress lines (also printed when a run ends)"""


@dataclass
class Report:
    """Export runs/<sweep> to results/<sweep> (if runs/<sweep> exists) and regenerate the results page from
    results/<sweep> alone: tables, statistics (rliable), learning curves and diagnostic figures."""
    sweep: str = "default"
    """the sweep's name (or runs/<sweep>, results/<sweep>)"""
    export: bool = True
    """refresh results/<sweep> from runs/<sweep> first (when runs/<sweep> exists)"""
    out: str = "docs/results.md"
    """the page"""
    figures: str = "docs/results"
    """the folder of its PNG figures"""
    reps: int = 20000
    """bootstrap replications of the IQM confidence intervals"""
    poi_reps: int = 2000
    """bootstrap replications of the probability-of-improvement intervals (a Mann-Whitney test each: slower)"""
    seed: int = 0
    """seed of the bootstrap"""
    tail_evals: int = 5
    """a second table scores each run by the mean of its last this many evaluations: how much of a difference between
    methods is one evaluation's noise (the headline score stays the last evaluation)"""
    runs_root: str = "runs"
    results_root: str = "results"


# ---- The grid --------------------------------------------------------------------------------------------------------
def script_path(script: str) -> str:
    path = script if script.endswith(".py") else script + ".py"
    return os.path.abspath(path if os.path.exists(path) else os.path.join(ROOT, path))


def flag_value(argv: list[str], flag: str) -> Optional[str]:
    """The value of `--flag` (also `--flag_name`, `--flag=value`) in a script's argv, the last one if repeated."""
    names, value = {"--" + flag, "--" + flag.replace("-", "_")}, None
    for i, a in enumerate(argv):
        if a in names and i + 1 < len(argv):
            value = argv[i + 1]
        elif a.split("=", 1)[0] in names and "=" in a:
            value = a.split("=", 1)[1]
    return value


def absolute_paths(argv: list[str]) -> list[str]:
    """--reuse-stages DIR made absolute: a run's process starts in its own folder."""
    out = list(argv)
    for i, a in enumerate(out):
        if a in ("--reuse-stages", "--reuse_stages") and i + 1 < len(out):
            out[i + 1] = os.path.abspath(out[i + 1])
        elif a.split("=", 1)[0] in ("--reuse-stages", "--reuse_stages") and "=" in a:
            out[i] = f"{a.split('=', 1)[0]}={os.path.abspath(a.split('=', 1)[1])}"
    return out


def grid_flag(flag: str, value: str) -> list[str]:
    """A grid value as argv: true/false switch a boolean flag (`--flag` / `--no-flag`, tyro's spelling); others pass on."""
    if value.lower() in ("true", "false"):
        return [f"--{flag}" if value.lower() == "true" else f"--no-{flag}"]
    return [f"--{flag}", value]


def make_specs(cfg: Run, extra: list[str], launch: str = "") -> list[dict]:
    """One spec (plain JSON: it travels to Ray workers) per run of the grid."""
    for a in extra:
        if a.startswith("--") and a[2:].split("=")[0].replace("_", "-") in ("variant", "seed", "resume"):
            raise SystemExit(f"benchmark.py: error: {a} after `--`: the runner sets --variant, --seed and --resume")
    axes = []
    for g in cfg.grid:
        flag, _, values = g.partition("=")
        if not values or flag.startswith("-"):
            raise SystemExit(f"benchmark.py: error: --grid {g!r}: write flag=v1,v2 (the flag without --)")
        if flag.replace("_", "-") in ("variant", "seed", "resume"):
            raise SystemExit(f"benchmark.py: error: --grid {g!r}: use --variants and --seeds (the runner sets --resume)")
        if flag_value(extra, flag) is not None:
            raise SystemExit(f"benchmark.py: error: --{flag} is both a grid axis and a flag after `--`")
        axes.append([(flag, v) for v in values.split(",")])
    specs = []
    # seed-major: a sweep stopped part-way has the same seeds of every variant, not all seeds of the first variants
    for seed, script, variant, combo in itertools.product(cfg.seeds, cfg.scripts, cfg.variants, itertools.product(*axes)):
        path = script_path(script)
        if not os.path.exists(path):
            raise SystemExit(f"benchmark.py: error: no training script {path}")
        stem = os.path.basename(path)[:-3]
        name = "__".join([stem, variant, *([",".join(f"{k}={v}" for k, v in combo)] if combo else []), f"s{seed}"])
        argv = absolute_paths(["--variant", variant, "--seed", str(seed), *[x for k, v in combo for x in grid_flag(k, v)],
                               *extra])
        specs.append(dict(sweep=cfg.sweep, name=name, script=path, variant=variant, seed=seed, grid=dict(combo),
                          argv=argv, run_dir=os.path.abspath(os.path.join(cfg.runs_root, cfg.sweep, name)),
                          export_dir=os.path.abspath(os.path.join(cfg.results_root, cfg.sweep, name)) if cfg.export else None,
                          env={k: os.environ[k] for k in ("MINARI_DATASETS_PATH",) if k in os.environ},
                          launch=launch))
    if len({s["name"] for s in specs}) < len(specs):
        raise SystemExit("benchmark.py: error: the grid names some runs twice (repeated values?)")
    return specs


# ---- One run: its state, its process, its record ---------------------------------------------------------------------
def trainer_dir(run_dir: str) -> Optional[str]:
    """The training script's own run directory inside the run folder (the newest with args.json)."""
    dirs = [d for d in glob.glob(os.path.join(run_dir, "runs", "*")) if os.path.exists(os.path.join(d, "args.json"))]
    return max(dirs, key=os.path.getmtime) if dirs else None


def run_state(spec: dict) -> tuple[str, Optional[str]]:
    """("done" | "resume" | "new" | "running", trainer dir). Done: results.json whose last evaluation reached the
    requested --total-steps (any, when the flag is not given), here or in the run's export; resume: a run directory
    with args.json."""
    lock = os.path.join(spec["run_dir"], ".lock")
    if os.path.exists(lock):
        try:
            with open(lock) as fh:
                host, pid = json.load(fh)
            here = host == socket.gethostname()  # here: the pid of the run's process; elsewhere: the heartbeat's age
            stale = not pid_alive(pid) if here else time.time() - os.path.getmtime(lock) > LOCK_STALE_S
        except (OSError, ValueError):
            stale = True
        if not stale:
            return "running", trainer_dir(spec["run_dir"])
    tdir = trainer_dir(spec["run_dir"])
    if tdir is None:
        return ("done", None) if exported_done(spec) else ("new", None)
    return ("done" if reached_total(spec, read_json(os.path.join(tdir, "results.json"))) else "resume"), tdir


def reached_total(spec: dict, results: Optional[dict]) -> bool:
    """Whether a run's results.json has an evaluation at the requested --total-steps (any, when the flag is not given)."""
    evals = (results or {}).get("evals")
    want = flag_value(spec["argv"], "total-steps")
    return bool(evals) and (want is None or evals[-1][0] >= int(want))


def exported_done(spec: dict) -> bool:
    """A finished run exported under the results root with the same flags, and no run folder here: a fresh clone (or
    another machine) continues a sweep from its committed results instead of training those runs again."""
    if not spec.get("export_dir"):
        return False
    record, res = (read_json(os.path.join(spec["export_dir"], f)) for f in ("run.json", "results.json"))
    if not record or not res or not res.get("evals"):
        return False
    if record.get("spec", {}).get("argv") != spec["argv"]:
        print(f"[benchmark] {spec['name']}: the export under {spec['export_dir']} was made with other flags "
              f"({' '.join(record.get('spec', {}).get('argv', []))}); training the run again overwrites it", flush=True)
        return False
    return reached_total(spec, res)


def pid_alive(pid: int) -> bool:
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


def machine() -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), cpu)
    except OSError:
        pass
    return dict(host=socket.gethostname(), cpu=cpu, cores=os.cpu_count(), cuda_visible=os.environ.get("CUDA_VISIBLE_DEVICES"))


def code_version(folder: str) -> Optional[str]:
    """The git commit of the training scripts' folder, "+modified" if tracked files differ from it (None: not a git
    work tree): recorded with every attempt, so that each exported number names the code that made it."""
    try:
        git = lambda *a: subprocess.run(["git", "-C", folder, *a], capture_output=True, text=True, check=True).stdout
        return git("rev-parse", "HEAD").strip() + ("+modified" if git("status", "--porcelain", "-uno").strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return None


LIVE: dict = {}  # pid -> Popen of the runs in flight in this process (stopped on Ctrl-C / SIGTERM)
STOPPING = {"local": False}  # the local pool was interrupted: no new run starts (a dict: Ray pickles it with execute)


def execute(spec: dict) -> dict:
    """Run (or continue) one run to its end in its folder and record the attempt; the same code in a local worker
    thread and in a Ray task. Returns a summary: name, state, rc, seconds, log tail."""
    state, tdir = run_state(spec)
    out = dict(name=spec["name"], state=state, rc=0, seconds=0.0, tail="")
    if state in ("done", "running") or STOPPING["local"]:
        return out
    run_dir = spec["run_dir"]
    os.makedirs(run_dir, exist_ok=True)
    lock = os.path.join(run_dir, ".lock")
    with open(lock, "w") as fh:
        json.dump([socket.gethostname(), os.getpid()], fh)
    cmd = [sys.executable, spec["script"], *spec["argv"]]
    if state == "resume":
        cmd += ["--resume", os.path.relpath(tdir, run_dir)]
    env = dict(os.environ, **spec["env"], OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    log_path, t0 = os.path.join(run_dir, "train.log"), time.time()
    code = code_version(os.path.dirname(os.path.abspath(spec["script"])))  # at the start: the checkout may move meanwhile
    # the attempt is on record from its start: a runner killed outright (a machine's session ending) leaves it open
    record_path = os.path.join(run_dir, "benchmark.json")
    record = read_json(record_path) or dict(spec=spec, attempts=[])
    record["spec"] = spec
    close_killed_attempts(record["attempts"], log_path)
    record["attempts"].append(dict(start=t0, end=None, rc=None, state=state, cmd=cmd, machine=machine(), code=code))
    write_json(record_path, record)
    try:
        rc = launch_and_wait(cmd, run_dir, env, log_path, lock, state, t0)
    finally:
        os.remove(lock)
    record["attempts"][-1].update(end=time.time(), rc=rc)
    write_json(record_path, record)
    out.update(rc=rc, seconds=time.time() - t0, tail="" if rc == 0 else tail(log_path))
    if spec["export_dir"]:
        try:
            export_run(run_dir, spec["export_dir"])
        except Exception as e:  # an export problem must not fail the run: `report` exports again
            out["tail"] += f"\n(export failed: {type(e).__name__}: {e})"
    return out


def close_killed_attempts(attempts: list[dict], log_path: str):
    """Attempts still open from a runner that was killed: they ended at the last write to train.log (progress lines
    come every few seconds), with no exit status."""
    for a in attempts:
        if a.get("end") is None:
            last_write = os.path.getmtime(log_path) if os.path.exists(log_path) else a["start"]
            a.update(end=max(a["start"], last_write), rc=None, killed=True)


def launch_and_wait(cmd: list[str], run_dir: str, env: dict, log_path: str, lock: str, state: str, t0: float) -> int:
    """The script's process with stdout and stderr appended to train.log; returns its exit status."""
    with open(log_path, "a") as log:
        log.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {socket.gethostname()} {state}: "
                  f"{' '.join(map(shlex.quote, cmd))}\n")
        log.flush()
        proc = subprocess.Popen(cmd, cwd=run_dir, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        LIVE[proc.pid] = proc
        with open(lock, "w") as fh:  # the run's own process: a runner killed with -9 leaves it running, and locked
            json.dump([socket.gethostname(), proc.pid], fh)
        try:
            while True:  # heartbeat: the lock's mtime says the run is alive (a dead runner's lock goes stale)
                try:
                    rc = proc.wait(timeout=60)
                    break
                except subprocess.TimeoutExpired:
                    os.utime(lock)
        except BaseException:  # interrupted (a cancelled Ray task): stop the run, it keeps its last checkpoint
            proc.terminate()
            proc.wait()
            raise
        finally:
            LIVE.pop(proc.pid, None)
        log.write(f"=== exit {rc} after {time.time() - t0:.0f} s\n")
    return rc


def tail(path: str, lines: int = 15) -> str:
    with open(path, errors="replace") as fh:
        return "".join(fh.readlines()[-lines:])


def read_json(path: str):
    try:
        with open(path) as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


def write_json(path: str, obj):
    with open(path + ".tmp", "w") as fh:
        json.dump(obj, fh, indent=1)
    os.replace(path + ".tmp", path)


# ---- The sweep: local pool or Ray --------------------------------------------------------------------------------------
def prepare_datasets(specs: list[dict]):
    """data_gen.py once per distinct dataset flags, one after the other (it reuses existing datasets)."""
    seen = set()
    for s in specs:
        data_gen = os.path.join(os.path.dirname(s["script"]), "data_gen.py")
        args = [x for f in DATA_FLAGS if (v := flag_value(s["argv"], f)) is not None for x in (f"--{f}", v)]
        if os.path.exists(data_gen) and (data_gen, *args) not in seen:
            seen.add((data_gen, *args))
            print(f"[benchmark] datasets: python data_gen.py {' '.join(args)}", flush=True)
            env = dict(os.environ, OMP_NUM_THREADS="1")
            if subprocess.run([sys.executable, data_gen, *args], cwd=os.path.dirname(data_gen), env=env).returncode:
                raise SystemExit("benchmark.py: error: data_gen.py failed (above); no run was started")


def run_sweep(cfg: Run, extra: list[str], launch: str = "") -> int:
    specs = make_specs(cfg, extra, launch)
    states = {s["name"]: run_state(s)[0] for s in specs}
    todo = [s for s in specs if states[s["name"]] == "resume"] + [s for s in specs if states[s["name"]] == "new"]
    counts = {k: list(states.values()).count(k) for k in ("done", "running", "resume", "new")}
    print(f"[benchmark] sweep {cfg.sweep}: {len(specs)} runs: {counts['done']} done, {counts['running']} running elsewhere, "
          f"{counts['resume']} to resume, {counts['new']} to start", flush=True)
    if cfg.dry_run:
        for s in specs:
            print(f"  {states[s['name']]:8s} {s['name']}: {os.path.basename(s['script'])} {' '.join(s['argv'])}")
        return 0
    if cfg.export:  # finished runs exported by an older runner, or by hand
        for s in specs:
            if states[s["name"]] == "done" and not os.path.exists(os.path.join(s["export_dir"], "run.json")):
                export_run(s["run_dir"], s["export_dir"])
    if not todo:
        return 0
    if cfg.data_gen:
        prepare_datasets(todo)
    past = [a["end"] - a["start"] for s in specs for a in (read_json(os.path.join(s["run_dir"], "benchmark.json")) or
                                                             {"attempts": []})["attempts"] if a["rc"] == 0]
    progress = Progress(len(todo), cfg.workers if not cfg.ray_address else None, past, cfg.progress_every)
    if cfg.ray_address:
        results = run_ray(cfg, todo, progress)
    else:
        results = run_local(cfg, todo, progress)
    failed = [r for r in results if r["rc"] != 0]
    for r in failed:
        print(f"[benchmark] FAILED {r['name']} (exit {r['rc']}); end of its log:\n{r['tail']}", flush=True)
    print(f"[benchmark] sweep {cfg.sweep}: {len(results) - len(failed)} runs ended, {len(failed)} failed; "
          f"`python benchmark.py report --sweep {cfg.sweep}` makes the results page", flush=True)
    return 1 if failed else 0


class Progress:
    """Progress lines: finished / running / left, and an ETA from the durations of finished runs (also earlier ones)."""

    def __init__(self, total: int, workers: Optional[int], past: list[float], every: float):
        self.total, self.workers, self.durations, self.every = total, workers, list(past), every
        self.done, self.failed, self.t = 0, 0, 0.0
        self.starts: list[float] = []  # start times of the runs in flight (a freed slot takes the next run at once)

    def ended(self, r: dict):
        self.done += 1
        self.failed += r["rc"] != 0
        if r["rc"] == 0 and r["state"] in ("new", "resume"):
            self.durations.append(r["seconds"])
        if self.starts:  # the run that ended is the one whose start time fits its duration best
            began = time.time() - r["seconds"]
            self.starts.remove(min(self.starts, key=lambda t: abs(t - began)))
        print(f"[benchmark] {'ok' if r['rc'] == 0 else 'FAILED'} {r['name']} ({r['state']}, {duration(r['seconds'])})",
              flush=True)

    def line(self, running: int, force: bool = False):
        if not force and time.time() - self.t < self.every:
            return
        self.t, left = time.time(), self.total - self.done - running
        self.starts = (self.starts + [self.t] * running)[:running]
        eta = ""
        if self.durations:  # the work left (a run's mean duration for each queued run, what remains of each run in
            mean = np.mean(self.durations)  # flight: at least a tenth of the mean) over the runs at a time
            work = left * mean + sum(max(mean - (self.t - t0), 0.1 * mean) for t0 in self.starts)
            eta = f", ETA {duration(work / (self.workers or max(1, running)))}"
        print(f"[benchmark] {self.done}/{self.total} finished ({self.failed} failed), {running} running, {left} left{eta}",
              flush=True)


def duration(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds < 3600 else f"{seconds / 3600:.1f} h" if seconds < 48 * 3600 else \
        f"{seconds / 86400:.1f} days"


def sigterm_as_interrupt(signum, _frame):
    raise KeyboardInterrupt


def run_local(cfg: Run, todo: list[dict], progress: Progress) -> list[dict]:
    results = []
    old = signal.signal(signal.SIGTERM, sigterm_as_interrupt)
    pool = ThreadPoolExecutor(max(1, cfg.workers))
    try:
        pending = {pool.submit(execute, s) for s in todo}
        progress.line(min(len(todo), cfg.workers), force=True)
        while pending:
            finished, pending = wait(pending, timeout=1.0, return_when=FIRST_COMPLETED)  # short: signals get through
            for f in finished:
                results.append(f.result())
                progress.ended(results[-1])
            progress.line(min(len(pending), cfg.workers), force=bool(finished))
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: stop the runs in flight (they keep their last checkpoint) and exit
        STOPPING["local"] = True
        for p in list(LIVE.values()):  # SIGTERM: a background shell starts its jobs with SIGINT ignored
            p.send_signal(signal.SIGTERM)
        print("[benchmark] interrupted: the runs in flight were stopped; launch the same command to continue", flush=True)
        pool.shutdown(wait=True, cancel_futures=True)
        raise SystemExit(130)
    finally:
        signal.signal(signal.SIGTERM, old)
    pool.shutdown()
    return results


def run_ray(cfg: Run, todo: list[dict], progress: Progress) -> list[dict]:
    import ray  # only here: the training scripts and the local pool never need it

    if not ray.is_initialized():
        if cfg.ray_address == "local":
            ray.init(num_cpus=cfg.workers)
        else:
            ray.init(address=cfg.ray_address)
    if __name__ != "__main__":  # imported (tests): ship this module's functions by value to the workers
        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    task = ray.remote(num_cpus=1, num_gpus=cfg.gpus_per_run, max_retries=0)(execute)  # no retry: relaunch resumes
    refs, results = [task.remote(s) for s in todo], []
    names = {ref: s["name"] for ref, s in zip(refs, todo)}
    slots = max(1, int(ray.cluster_resources().get("GPU" if cfg.gpus_per_run else "CPU", 1) /
                       (cfg.gpus_per_run or 1)))  # runs at a time, for the progress line (the cluster may grow)
    progress.line(min(len(refs), slots), force=True)
    old = signal.signal(signal.SIGTERM, sigterm_as_interrupt)
    try:
        while refs:
            ready, refs = ray.wait(refs, num_returns=1, timeout=1.0)
            for r in ready:
                try:
                    results.append(ray.get(r))
                except ray.exceptions.RayError as e:  # the worker died: the run stays resumable
                    results.append(dict(name=names[r], state="?", rc=-1, seconds=0.0, tail=str(e)[-2000:]))
                progress.ended(results[-1])
            progress.line(min(len(refs), slots), force=bool(ready))
    except KeyboardInterrupt:  # queued runs never start; a run in flight gets its task's KeyboardInterrupt: stopped
        for r in refs:
            ray.cancel(r)
        ray.wait(refs, num_returns=len(refs), timeout=30)
        print("[benchmark] interrupted: the runs in flight were stopped; launch the same command to continue", flush=True)
        raise SystemExit(130)
    finally:
        signal.signal(signal.SIGTERM, old)
    return results


# ---- Export: the small files of a run, committed under results/<sweep>/<run name>/ ----------------------------------------
def export_run(run_dir: str, dest: str, max_points: int = 250):
    """run.json (the runner's record), args.json, results.json, curves.csv (tag, step, value; every tag thinned to
    <= max_points steps, evaluations never), z_pca.csv (the 2-D PCA of the z embedding, label columns), adv_hist.csv
    (the advantage histograms per domain-quality, summed over the steps: the scorers are frozen in stage 5)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tdir = trainer_dir(run_dir)
    if tdir is None:
        return
    os.makedirs(dest, exist_ok=True)
    record = read_json(os.path.join(run_dir, "benchmark.json")) or {}
    attempts = record.get("attempts", [])
    ea = EventAccumulator(tdir, size_guidance={"scalars": 0, "histograms": 0, "tensors": 0},  # 0: keep every event
                          purge_orphaned_data=False).Reload()  # the scripts' --resume already cut what they log again
    wall = [e.wall_time for tag in ea.Tags()["scalars"] for e in ea.Scalars(tag)]
    write_json(os.path.join(dest, "run.json"), dict(
        spec={k: v for k, v in record.get("spec", {}).items() if k not in ("run_dir", "export_dir", "env", "script")},
        script=os.path.basename(record.get("spec", {}).get("script", "")), trainer_dir=os.path.basename(tdir),
        attempts=[{k: a.get(k) for k in ("start", "end", "rc", "state", "machine", "code", "killed") if k in a}
                  for a in attempts],  # an attempt in flight has no end yet: it counts until now
        wall_s=sum((a["end"] or time.time()) - a["start"] for a in attempts) if attempts else
        (max(wall) - min(wall) if wall else None)))
    for f in ("args.json", "results.json"):
        if os.path.exists(os.path.join(tdir, f)):
            write_json(os.path.join(dest, f), read_json(os.path.join(tdir, f)))
    with open(os.path.join(dest, "curves.csv"), "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["tag", "step", "value"])
        for tag in sorted(ea.Tags()["scalars"]):
            pts = sorted({e.step: e.value for e in ea.Scalars(tag)}.items())  # one value per step (the last)
            if len(pts) > max_points and not tag.startswith("eval/"):
                pts = [pts[i] for i in sorted(set(np.linspace(0, len(pts) - 1, max_points).round().astype(int)))]
            w.writerows([tag, s, f"{v:.6g}"] for s, v in pts)
    hists = [t for t in ea.Tags()["histograms"] if t.startswith("filter/adv/")]
    if hists:
        with open(os.path.join(dest, "adv_hist.csv"), "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["group", "right_edge", "count"])
            for tag in sorted(hists):
                counts: dict = {}
                for e in ea.Histograms(tag):
                    h = e.histogram_value
                    for lim, c in zip(h.bucket_limit, h.bucket):
                        counts[lim] = counts.get(lim, 0.0) + c
                w.writerows([tag.split("/", 2)[2], f"{lim:.6g}", f"{c:g}"] for lim, c in sorted(counts.items()))
    emb = sorted(glob.glob(os.path.join(tdir, "*", "z", "tensors.tsv")))
    if emb:
        z = np.loadtxt(emb[-1], delimiter="\t", ndmin=2)
        with open(os.path.join(os.path.dirname(emb[-1]), "metadata.tsv")) as fh:
            labels = [line.rstrip("\n").split("/", 1) for line in fh if line.strip()]
        zc = z - z.mean(0)
        _, sv, vt = np.linalg.svd(zc, full_matrices=False)  # PCA: the top-2 right singular vectors
        pcs, var = zc @ vt[:2].T, sv**2 / max(1e-12, (sv**2).sum())
        with open(os.path.join(dest, "z_pca.csv"), "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["pc1", "pc2", "domain", "quality", f"var1={var[0]:.4f}", f"var2={var[1] if len(var) > 1 else 0:.4f}"])
            w.writerows([f"{a:.5g}", f"{b:.5g}", *lab] for (a, b), lab in zip(pcs, labels))


# ---- Report ------------------------------------------------------------------------------------------------------------
def load_runs(folder: str) -> list[dict]:
    """Exported runs: dicts with the task, the method, finished or not, the final score, the curves and the record."""
    runs = []
    for d in sorted(glob.glob(os.path.join(folder, "*", "run.json"))):
        d = os.path.dirname(d)
        rec, args, res = (read_json(os.path.join(d, f)) for f in ("run.json", "args.json", "results.json"))
        if not args:
            continue
        script = args.get("script") or rec.get("script") or "?"
        grid = rec.get("spec", {}).get("grid", {})
        task = (script.removesuffix(".py"), args.get("env_id"), args.get("target_size"), args.get("source"),
                args.get("source_size"))
        extra = [f"{k}={v}" for k, v in grid.items() if k.replace("-", "_") not in TASK_FLAGS]
        finished = bool(res and res.get("evals") and res["evals"][-1][0] >= args.get("total_steps", 0))
        evals = [e[2] for e in res["evals"]] if finished else []  # [step, return, normalized score] per evaluation
        curves: dict = {}
        if os.path.exists(os.path.join(d, "curves.csv")):
            with open(os.path.join(d, "curves.csv")) as fh:
                for row in csv.DictReader(fh):
                    curves.setdefault(row["tag"], []).append((int(row["step"]), float(row["value"])))
        runs.append(dict(dir=d, name=os.path.basename(d), task=task, variant=args.get("variant"), seed=args.get("seed"),
                         method=" ".join([args.get("variant", "?"), *extra]), args=args, rec=rec,
                         finished=finished, score=res["final_normalized_score"] if finished else None, evals=evals,
                         curves=curves))
    return runs


def task_label(task) -> str:
    script, env, tsize, source, ssize = task
    return f"{env}, {script.replace('v2a_', '').upper()}, target {tsize:,}" + (f", source {source}" if source else "")


def task_slug(task) -> str:
    script, env, tsize, source, ssize = task
    return f"{env}_{script.replace('v2a_', '')}_t{tsize}" + (f"_{zlib.crc32(source.encode()) % 10**6}" if source else "")


def method_order(m: str) -> tuple:
    v = m.split(" ")[0]
    return (VARIANTS.index(v) if v in VARIANTS else len(VARIANTS), m)


def tail_score(r: dict, k: int) -> float:
    """The mean of a finished run's last k evaluations."""
    return float(np.mean(r["evals"][-k:]))


def task_stats(runs: list[dict], reps: int, poi_reps: int, seed: int, score: Callable = lambda r: r["score"]) -> dict:
    """Per method: n, mean, standard error, IQM with its 95 % stratified-bootstrap CI (rliable) of `score` (default: the
    last evaluation) over the finished runs; per (v2a method, other method): probability of improvement with its CI."""
    from rliable import library, metrics
    warnings.filterwarnings("ignore", category=FutureWarning, module="arch")  # rliable 1.2 passes arch's random_state

    scores = {}
    for r in runs:
        if r["finished"]:
            scores.setdefault(r["method"], []).append(score(r))
    out = {"methods": {}, "poi": {}}
    rs = np.random.RandomState(seed)
    for m, s in sorted(scores.items(), key=lambda kv: method_order(kv[0])):
        x = np.asarray(s, float)
        iqm, ci = library.get_interval_estimates({m: x[:, None]}, lambda v: np.array([metrics.aggregate_iqm(v)]),
                                                 reps=reps, random_state=rs)
        out["methods"][m] = dict(n=len(x), mean=float(x.mean()), se=float(x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1
                                 else float("nan"), iqm=float(iqm[m][0]), iqm_ci=[float(ci[m][0][0]), float(ci[m][1][0])],
                                 scores=x.tolist())
    for a in [m for m in out["methods"] if m.split(" ")[0] == "v2a"]:
        for b in [m for m in out["methods"] if m.split(" ")[0] != "v2a"]:
            x, y = (np.asarray(scores[k], float)[:, None] for k in (a, b))
            # rliable's independent-samples bootstrap (two score arrays) ignores random_state and draws its indices
            # from NumPy's global RNG: seed that from rs, or these CIs change from one regeneration to the next
            np.random.seed(rs.randint(2**31))
            p, ci = library.get_interval_estimates({"p": (x, y)}, metrics.probability_of_improvement, reps=poi_reps,
                                                   random_state=rs)
            out["poi"][(a, b)] = dict(p=float(np.squeeze(p["p"])), ci=[float(np.squeeze(ci["p"][0])),
                                                                      float(np.squeeze(ci["p"][1]))])
    return out


MIN_SEEDS_FOR_VERDICT = 3  # with fewer seeds the bootstrap CIs are the runs themselves: "disjoint" would say nothing


def ranking_lines(stats: dict, present: set) -> list[str]:
    """Whether v2a > dvdf > igdf > merged and v2a > target hold, pair by pair, by the IQM and its 95 % CIs (per group
    of grid flags), for the pairs whose two methods the sweep runs (`present`: the methods with any run, finished or
    not)."""
    lines, ms = [], stats["methods"]
    for suffix in sorted({m.partition(" ")[2] for m in ms}):
        names = [" ".join(filter(None, [v, suffix])) for v in RANKING]
        base = " ".join(filter(None, [BASELINE, suffix]))
        pairs = [(a, b) for a, b in [*zip(names, names[1:]), (names[0], base)] if a in present and b in present]
        for a, b in pairs:
            if a not in ms or b not in ms or min(ms[a]["n"], ms[b]["n"]) < MIN_SEEDS_FOR_VERDICT:
                have = ", ".join(f"{m}: {ms[m]['n'] if m in ms else 0}" for m in (a, b))
                lines.append(f"- `{a}` > `{b}`: not testable yet (finished seeds {have}; a verdict needs "
                             f"{MIN_SEEDS_FOR_VERDICT} of each)")
                continue
            (la, ha), (lb, hb) = ms[a]["iqm_ci"], ms[b]["iqm_ci"]
            verdict = ("**holds beyond the CIs** (disjoint)" if la > hb else "**reversed beyond the CIs**" if ha < lb else
                       "holds for the IQM only; the CIs overlap" if ms[a]["iqm"] > ms[b]["iqm"] else
                       "does not hold for the IQM; the CIs overlap")
            lines.append(f"- `{a}` > `{b}`: {verdict} (IQM {ms[a]['iqm']:.1f} [{la:.1f}, {ha:.1f}] vs "
                         f"{ms[b]['iqm']:.1f} [{lb:.1f}, {hb:.1f}])")
        for b, paper in [*PAPER_GAIN.items(), (BASELINE, None)]:
            a, bb = names[0], " ".join(filter(None, [b, suffix]))
            if a in ms and bb in ms and ms[bb]["mean"]:
                gain = 100 * (ms[a]["mean"] - ms[bb]["mean"]) / abs(ms[bb]["mean"])
                lines.append(f"- mean of `{a}` (n={ms[a]['n']}) relative to `{bb}` (n={ms[bb]['n']}): {gain:+.1f} %"
                             + (f" (paper: +{paper} %)" if paper is not None else ""))
    return lines


def mean_ci(values: np.ndarray, rs: np.random.RandomState, reps: int = 2000):
    """Mean over seeds and its 95 % percentile-bootstrap CI (columns: steps)."""
    boots = values[rs.randint(len(values), size=(reps, len(values)))].mean(1)
    return values.mean(0), np.percentile(boots, 2.5, axis=0), np.percentile(boots, 97.5, axis=0)


def on_common_steps(curves: list[dict]) -> tuple[list, np.ndarray]:
    """Curves ({step: value}, one per run) on the steps that all of them reached: (steps, values [runs, steps])."""
    steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
    return steps, np.array([[c[s] for s in steps] for c in curves])


def plot_curves(tasks: dict, path: str, seed: int):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rs = np.random.RandomState(seed)
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4), squeeze=False)
    for ax, (task, runs) in zip(axes[0], tasks.items()):
        for m in sorted({r["method"] for r in runs}, key=method_order):
            steps, v = on_common_steps([dict(r["curves"].get("eval/normalized_score", [])) for r in runs if r["method"] == m])
            if not steps:
                continue
            mu, lo, hi = mean_ci(v, rs)
            ax.plot(steps, mu, label=f"{m} (n={len(v)})")
            ax.fill_between(steps, lo, hi, alpha=0.2)
        ax.set_title(task_label(task).replace(", source ", "\nsource "), fontsize=9)
        ax.set(xlabel="stage-5 gradient steps", ylabel="normalized score")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def central_range(hists: list, lo: float = 0.01, hi: float = 0.99) -> tuple[float, float]:
    """The lo and hi quantiles of pooled histograms given as (right bucket edge, count) pairs."""
    edges, counts = np.array(sorted(p for h in hists for p in h)).T
    cdf = np.cumsum(counts) / counts.sum()
    a, b = edges[np.searchsorted(cdf, lo, side="right")], edges[min(np.searchsorted(cdf, hi), len(edges) - 1)]
    pad = 0.05 * (b - a) or 1.0
    return float(a - pad), float(b + pad)


def plot_diagnostics(task, runs: list[dict], folder: str) -> list[tuple[str, str]]:
    """The z embedding (v2a), the advantage per domain x quality (v2a, dvdf), stage 1's curves (every run with a
    stage 1), the kept fractions (filtered variants), the critics' values and the actor's weight on source rows
    (VALUE_TAGS, the runs that log them); from the lowest seed of each variant for the first two, every seed for the
    third, the mean over seeds for the last two. Returns (file name, caption) per figure made."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made, slug = [], task_slug(task)

    def save(fig, name: str, caption: str):
        fig.tight_layout()
        fig.savefig(os.path.join(folder, f"{name}_{slug}.png"), dpi=110)
        plt.close(fig)
        made.append((f"{name}_{slug}.png", caption))

    first = {}
    for r in sorted(runs, key=lambda r: r["seed"]):
        first.setdefault(r["method"], r)
    v2a = [r for m, r in first.items() if m.split(" ")[0] == "v2a" and os.path.exists(os.path.join(r["dir"], "z_pca.csv"))]
    if v2a:
        r = v2a[0]
        with open(os.path.join(r["dir"], "z_pca.csv")) as fh:
            rows = list(csv.reader(fh))
        head, rows = rows[0], rows[1:]
        xy = np.array([[float(a), float(b)] for a, b, *_ in rows])
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
        for ax, col, what in zip(axes, (2, 3), ("domain", "quality")):
            for lab in sorted({row[col] for row in rows}):
                sel = np.array([row[col] == lab for row in rows])
                ax.scatter(xy[sel, 0], xy[sel, 1], s=4, alpha=0.6, label=lab)
            var = [float(h.split("=")[1]) for h in head[4:6]]
            ax.set(title=f"z of source trajectories by {what} ({r['method']}, seed {r['seed']})",
                   xlabel=f"PC1 ({100 * var[0]:.0f} % of the variance)", ylabel=f"PC2 ({100 * var[1]:.0f} %)")
            ax.legend(fontsize=8, markerscale=3)
        save(fig, "z", "The modality latent z (the posterior mean of each source trajectory, stage 2's "
             "relabelling; first two principal components), coloured by domain and by behaviour quality (as in "
             "the paper's Fig. 2).")
    adv = [r for m, r in first.items()
           if m.split(" ")[0] in ("v2a", "dvdf") and os.path.exists(os.path.join(r["dir"], "adv_hist.csv"))]
    if adv:
        fig, axes = plt.subplots(1, len(adv), figsize=(5.5 * len(adv), 4), squeeze=False)
        for ax, r in zip(axes[0], sorted(adv, key=lambda r: method_order(r["method"]))):
            groups: dict = {}
            with open(os.path.join(r["dir"], "adv_hist.csv")) as fh:
                for row in csv.DictReader(fh):
                    groups.setdefault(row["group"], []).append((float(row["right_edge"]), float(row["count"])))
            # TensorBoard's buckets grow exponentially away from 0 (some are 1e-12 wide): re-bin them uniformly over the
            # central range (each bucket's count spread over its span), or a few far outliers squeeze the bodies to a line
            lo, hi = central_range(list(groups.values()))
            bins = np.linspace(lo, hi, 61)
            for g, pts in sorted(groups.items()):
                edges, counts = np.array(pts).T
                cdf = np.interp(bins, edges, np.cumsum(counts) / counts.sum())
                ax.step(bins[1:], np.diff(cdf) / np.diff(bins), where="pre", label=g)
            ax.set_xlim(lo, hi)
            ax.set(title=f"advantage A per domain-quality ({r['method']}, seed {r['seed']})",
                   xlabel="A (1st-99th percentile of all groups shown)", ylabel="density")
            ax.legend(fontsize=7)
        save(fig, "adv", "The advantage A of the source rows per domain-quality group, as the stage-5 "
             "filter sees it: V2A's A(s, a, z) against DVDF's z-free A(s, a) (as in the paper's Fig. 2).")
    stage1 = [r for r in sorted(runs, key=lambda r: (method_order(r["method"]), r["seed"]))
              if "repr/stage1_domain_probe_acc" in r["curves"]]
    if stage1:  # has stage 1 trained long enough? (the --repr-steps budget: both curves flat)
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for r in stage1:
            for ax, tag in zip(axes, ("repr/rec_loss", "repr/stage1_domain_probe_acc")):
                if r["curves"].get(tag):
                    ax.plot(*zip(*r["curves"][tag]), label=f"{r['method']} s{r['seed']}", alpha=0.8)
        axes[0].set(title="stage 1: TC-ELBO reconstruction loss", xlabel="TC-ELBO iterations", ylabel="L_rec", yscale="log")
        axes[1].set(title="stage 1: held-out domain probe on z", xlabel="TC-ELBO iterations", ylabel="accuracy",
                    ylim=(0, 1.02))
        for ax in axes:
            ax.legend(fontsize=7)
        save(fig, "stage1", "Stage 1 over its iterations, every seed: the TC-ELBO reconstruction loss "
             "and the accuracy of a domain probe on z (held-out trajectories); flat curves justify --repr-steps.")
    kept = sorted({r["method"] for r in runs if any(t.startswith("filter/kept_frac/") for t in r["curves"])}, key=method_order)
    if kept:
        fig, axes = plt.subplots(len(kept), 2, figsize=(11, 3.2 * len(kept)), squeeze=False)
        for row_axes, m in zip(axes, kept):
            rr = [r for r in runs if r["method"] == m]
            tags = sorted({t for r in rr for t in r["curves"] if t.startswith("filter/kept_frac/")})
            for tag in tags:
                name = tag.rsplit("/", 1)[1]
                ax = row_axes[1] if name in ("random", "medium", "expert") else row_axes[0]
                steps, v = on_common_steps([dict(r["curves"][tag]) for r in rr if tag in r["curves"]])
                if steps:
                    ax.plot(steps, v.mean(0), label=name)
            for ax, what in zip(row_axes, ("domain", "quality")):
                ax.set(title=f"{m}: kept fraction per {what} (mean of {len(rr)} seeds)", xlabel="stage-5 steps",
                       ylabel="kept fraction", ylim=(0, 1))
                ax.legend(fontsize=8)
        save(fig, "kept", "The stage-5 filter over training: the fraction of each domain's and each "
             "behaviour quality's source rows that it keeps, mean over seeds.")
    value_tags = [t for t in VALUE_TAGS if any(t in r["curves"] for r in runs)]
    if value_tags:  # do the critics drift on the source rows, and how much of the actor's regression do they carry?
        fig, axes = plt.subplots(1, len(value_tags), figsize=(5.5 * len(value_tags), 4), squeeze=False)
        methods = sorted({r["method"] for r in runs}, key=method_order)  # one colour per method in every panel
        for ax, tag in zip(axes[0], value_tags):
            for colour, m in enumerate(methods):
                steps, v = on_common_steps([dict(r["curves"][tag]) for r in runs if r["method"] == m and tag in r["curves"]])
                if steps:
                    ax.plot(steps, v.mean(0), label=f"{m} ({len(v)} seed{'s' * (len(v) > 1)})", color=f"C{colour}")
            ax.set(title=VALUE_TAGS[tag], xlabel="stage-5 steps")
            ax.legend(fontsize=7)
        logs_share = "charts/awr_weight_source_share" in value_tags
        share = ", and the source rows' share of the actor's advantage weight" * logs_share
        save(fig, "values", f"The critics' values on the target and the source rows of each batch{share}, "
             "mean over seeds.")
    return made


# the stage-5 diagnostics of the values figure (runs from before they were logged have none): tag -> panel title
VALUE_TAGS = {"charts/q_target_rows": "min Q on the batch's target rows (mean of seeds)",
              "charts/q_source_rows": "min Q on the batch's source rows (mean of seeds)",
              "charts/awr_weight_source_share": "IQL: source rows' share of the actor's weight"}


def fmt(x: float, nd: int = 1) -> str:
    return "–" if x is None or not np.isfinite(x) else f"{x:.{nd}f}"


def report(cfg: Report) -> dict:
    sweep = os.path.basename(cfg.sweep.rstrip("/"))
    runs_dir, res_dir = os.path.join(cfg.runs_root, sweep), os.path.join(cfg.results_root, sweep)
    if cfg.export and os.path.isdir(runs_dir):
        for d in sorted(glob.glob(os.path.join(runs_dir, "*", ""))):
            export_run(d, os.path.join(res_dir, os.path.basename(d.rstrip("/"))))
    runs = load_runs(res_dir)
    os.makedirs(cfg.figures, exist_ok=True)
    tasks: dict = {}
    for r in runs:
        tasks.setdefault(r["task"], []).append(r)
    fig_rel = os.path.relpath(cfg.figures, os.path.dirname(os.path.abspath(cfg.out)))
    L = [f"# Results: sweep `{sweep}`", "",
         f"Generated by `python benchmark.py report --sweep {sweep}` from the exported runs in `{res_dir}/` "
         "(args.json, results.json, curves.csv of every run); do not edit by hand, regenerate. "
         "Score: the normalized score of the **last** evaluation (not the best), 100 · (return − ref_min) / "
         "(ref_max − ref_min) with reference returns measured in our own target envs (not comparable with D4RL). "
         f"IQM: interquartile mean; CIs: 95 % stratified-bootstrap percentile intervals ({cfg.reps} replications for the IQM, "
         f"{cfg.poi_reps} for P(V2A > X); rliable); "
         "P(V2A > X): probability that a V2A run beats an X run (Mann-Whitney, rliable's probability_of_improvement).", ""]
    stats_all = {}
    if not runs:
        L += [f"**No runs exported yet** under `{res_dir}/`. Start the sweep (docs/benchmark.md), then regenerate.", ""]
    if tasks:
        plot_curves(tasks, os.path.join(cfg.figures, f"curves_{sweep}.png"), cfg.seed)
    for task, truns in sorted(tasks.items(), key=lambda kv: str(kv[0])):
        st = stats_all[task] = task_stats(truns, cfg.reps, cfg.poi_reps, cfg.seed)
        L += [f"## {task_label(task)}", "", "| method | seeds finished | unfinished | mean ± s.e. | IQM [95 % CI] | "
              "P(V2A > method) [95 % CI] | seeds |", "|---|---|---|---|---|---|---|"]
        for m in sorted({r["method"] for r in truns}, key=method_order):
            s = st["methods"].get(m)
            unf = sum(1 for r in truns if r["method"] == m and not r["finished"])
            seeds = sorted(r["seed"] for r in truns if r["method"] == m and r["finished"])
            if s:
                L.append(f"| {m} | {s['n']} | {unf} | {stat_cells(st, m)} | {seeds} |")
            else:
                L.append(f"| {m} | 0 | {unf} | – | – | – | – |")
        if ranking := ranking_lines(st, {r["method"] for r in truns}):
            L += ["", "Ranking V2A > DVDF > IGDF > merged, and V2A > target only (by the IQM and its 95 % CI):", "", *ranking]
        st["tail"] = task_stats(truns, cfg.reps, cfg.poi_reps, cfg.seed, lambda r: tail_score(r, cfg.tail_evals))
        L += ["", *tail_lines(cfg.tail_evals, truns, st["tail"]), ""]
        for f, caption in plot_diagnostics(task, [r for r in truns if r["finished"]], cfg.figures):  # the table's runs
            L += [f"![{f}]({fig_rel}/{f})", "", f"*{caption}*", ""]
    if tasks:
        L += ["## Learning curves", "", "Normalized score at each evaluation: mean over seeds, shaded 95 % percentile-"
              "bootstrap CI of the mean; only the steps that every run of a method has reached.", "",
              f"![learning curves]({fig_rel}/curves_{sweep}.png)", ""]
    reading = os.path.join(res_dir, "reading.md")  # written by hand, kept with the exported runs: regenerating keeps it
    L += ["## Reading", ""]
    if os.path.exists(reading):
        with open(reading) as fh:
            L += [f"(From `{reading}`, written by hand for the runs above.)", "", fh.read().strip(), ""]
    else:
        L += ["> **TODO (lead): interpretation.** What the numbers do and do not show: whether V2A > DVDF > IGDF > merged "
              "holds beyond the CIs (above), the gains against the paper's +13.7 % (DVDF) and +21.4 % (IGDF), and where "
              "the ranking does not appear, what the diagnostics (z separation, advantage distributions, kept fractions) "
              f"say about why. Write it to `{reading}`; the report includes it.", ""]
    L += setup_lines(runs)
    os.makedirs(os.path.dirname(os.path.abspath(cfg.out)), exist_ok=True)
    with open(cfg.out, "w") as fh:
        fh.write("\n".join(L))
    print(f"[benchmark] wrote {cfg.out} and {cfg.figures}/ from {len(runs)} runs in {len(tasks)} tasks", flush=True)
    return stats_all


def stat_cells(st: dict, m: str) -> str:
    """The table cells of method m: mean ± s.e. | IQM [95 % CI] | P(V2A > m) [95 % CI] (naming the v2a method when
    the task has several)."""
    s, several = st["methods"][m], len({a for a, _ in st["poi"]}) > 1
    pois = [f"{p['p']:.2f} [{p['ci'][0]:.2f}, {p['ci'][1]:.2f}]" + (f" ({a})" if several else "")
            for (a, b), p in st["poi"].items() if b == m]
    return (f"{fmt(s['mean'])} ± {fmt(s['se'])} | {fmt(s['iqm'])} [{fmt(s['iqm_ci'][0])}, {fmt(s['iqm_ci'][1])}] | "
            f"{'; '.join(pois) or '–'}")


def tail_lines(k: int, truns: list[dict], tail: dict) -> list[str]:
    """The check of evaluation noise: `tail`, the statistics of each run's mean over its last k evaluations, as a
    table with the spread of those evaluations within a run, and its ranking."""
    L = [f"**Evaluation noise.** The same statistics with each run scored by the mean of its last {k} evaluations "
         "instead of the last one alone (a check, not the headline score); sd within a run: the standard deviation of "
         f"those {k} evaluations, mean over the seeds.", "",
         f"| method | mean of last {k} evaluations: mean ± s.e. | IQM [95 % CI] | P(V2A > method) [95 % CI] | "
         "sd within a run |", "|---|---|---|---|---|"]
    for m in tail["methods"]:
        sds = [float(np.std(r["evals"][-k:], ddof=1)) for r in truns if r["method"] == m and r["finished"]
               and len(r["evals"]) > 1]
        L.append(f"| {m} | {stat_cells(tail, m)} | {fmt(float(np.mean(sds))) if sds else '–'} |")
    if ranking := ranking_lines(tail, {r["method"] for r in truns}):
        L += ["", f"Ranking by the mean of the last {k} evaluations:", "", *ranking]
    return L


def setup_lines(runs: list[dict]) -> list[str]:
    """Commands, seeds, budgets, machines and wall time, from the exported records."""
    L = ["## Setup", "", "Commands (as launched; re-launching one continues its sweep):", "", "```bash"]
    L += sorted({r["rec"].get("spec", {}).get("launch", "?") for r in runs}) or ["# none yet"]
    L += ["```", ""]
    budget_keys = ("repr_steps", "sql_steps", "info_steps", "total_steps", "eval_freq", "eval_episodes")
    budgets = sorted({json.dumps({k: r["args"].get(k) for k in budget_keys}) for r in runs})
    L += ["Budgets: " + ("; ".join(budgets) or "–"), ""]
    machines = sorted({f"{a['machine']['host']} ({a['machine']['cpu']}, {a['machine']['cores']} cores)"
                       for r in runs for a in r["rec"].get("attempts", [])})
    L += ["Machines: " + ("; ".join(machines) or "–") + ". One CPU thread per run (OMP_NUM_THREADS=1).", ""]
    codes = sorted({a.get("code") or "not recorded" for r in runs for a in r["rec"].get("attempts", [])})
    L += ["Code (git commit of the training scripts at each attempt): " + (", ".join(f"`{c}`" for c in codes) or "–"), ""]
    if runs:
        L += ["| method | task | seeds (finished) | wall time per finished run, h: mean [min, max] | core-hours |",
              "|---|---|---|---|---|"]
        groups: dict = {}
        for r in runs:
            groups.setdefault((r["method"], task_label(r["task"])), []).append(r)
        total = 0.0
        for (m, t), rr in sorted(groups.items(), key=lambda kv: (kv[0][1], method_order(kv[0][0]))):
            w = [r["rec"].get("wall_s") or 0 for r in rr if r["finished"]]
            allw = sum(r["rec"].get("wall_s") or 0 for r in rr) / 3600
            total += allw
            span = f"{np.mean(w) / 3600:.2f} [{min(w) / 3600:.2f}, {max(w) / 3600:.2f}]" if w else "–"
            L.append(f"| {m} | {t} | {sorted(r['seed'] for r in rr if r['finished'])} | {span} | {allw:.1f} |")
        L += ["", f"Core-hours spent (all attempts, finished or not): {total:.1f}.", ""]
    return L


def main(argv: list[str]) -> int:
    argv_all, extra = list(argv), []
    if "--" in argv:  # everything after `--` goes to every run
        argv, extra = argv[: argv.index("--")], argv[argv.index("--") + 1 :]
    cfg = tyro.extras.subcommand_cli_from_dict({"run": Run, "report": Report}, args=argv,
                                                description="Sweep runner and results report (docs/benchmark.md).")
    if isinstance(cfg, Report):
        if extra:
            raise SystemExit("benchmark.py: error: report takes no flags after `--`")
        report(cfg)
        return 0
    return run_sweep(cfg, extra, " ".join(map(shlex.quote, ["python", "benchmark.py", *argv_all])))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
