# Sweep runner and results report for the V2A training scripts (docs/benchmark.md).
#   python benchmark.py run --sweep hopper --variants v2a dvdf igdf merged target --seeds 1 2 3 4 5 -- --total-steps 300000
#   python benchmark.py report --sweep hopper        # -> docs/results/hopper.md, docs/results/hopper/*.png
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
    """Export runs/<sweep> to results/<sweep> (if runs/<sweep> exists) and regenerate the sweep's own page
    (docs/results/<sweep>.md, figures in docs/results/<sweep>/) from results/<sweep> alone, then the index
    docs/results.md: tables judged by the verdict rule (docs/benchmark.md), rliable statistics, learning curves and
    diagnostic figures."""
    sweep: str = "default"
    """the sweep's name (or runs/<sweep>, results/<sweep>)"""
    export: bool = True
    """refresh results/<sweep> from runs/<sweep> first (when runs/<sweep> exists)"""
    pages: str = "docs/results"
    """the folder of the results pages: this sweep's page is <pages>/<sweep>.md and its figures <pages>/<sweep>/*.png
    (a report writes only its own sweep's page and folder there: it never overwrites another sweep's)"""
    index: str = "docs/results.md"
    """the index of the pages in --pages, regenerated from the pages that exist ('': none)"""
    reps: int = 20000
    """bootstrap replications of the IQM confidence intervals"""
    poi_reps: int = 10000
    """bootstrap replications of the probability-of-improvement intervals (a Mann-Whitney statistic each: slower); many,
    because the verdict reads their 1 - 0.05 / k percentile bounds"""
    seed: int = 0
    """seed of the bootstrap"""
    tail_evals: int = 5
    """a second table scores each run by the mean of its last this many periodic evaluations: how much of a difference
    between methods is one evaluation's noise (a check; the score stays the final evaluation)"""
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
# The verdict rule (docs/benchmark.md#the-verdict-rule), fixed before the runs and applied to every table the same way
MIN_SEEDS = 5  # fewer finished seeds: mean and range only (a bootstrap over 3 runs is little more than the runs themselves)
ALPHA = 0.05  # family-wise error rate of a table's pairwise comparisons (Bonferroni: each CI at 1 - ALPHA / k)
EXPERT = 100.0  # the normalized score of the target env's expert (ref_max): the optimality gap's threshold
# the backbone's input scaling and actor settings (flags newer than the Hopper sweep): part of the task, not a method
NORM_FLAGS = ("normalize_states", "reward_scale", "awr_clip", "actor_schedule")
# Runners older than commit 4b8be74 (2026-11-26 14:54:51 UTC) read an attempt's code version when the attempt ended, so
# an attempt that started before it names the checkout at its end, not the code it started with
CODE_AT_START_SINCE = 1795704891
REPORT_SECTIONS = ("Reading", "Setup")  # the page's sections that are not tables (the index lists the tables)


def load_runs(folder: str) -> list[dict]:
    """Exported runs: dicts with the task, the method, finished or not, the score and how it was measured, the periodic
    evaluations, the curves and the record."""
    runs = []
    for d in sorted(glob.glob(os.path.join(folder, "*", "run.json"))):
        d = os.path.dirname(d)
        rec, args, res = (read_json(os.path.join(d, f)) for f in ("run.json", "args.json", "results.json"))
        if not args:
            continue
        script = (args.get("script") or rec.get("script") or "?").removesuffix(".py")
        grid = rec.get("spec", {}).get("grid", {})
        task = (script, args.get("env_id"), args.get("target_size"), args.get("source"), args.get("source_size"),
                tuple((k, args[k]) for k in NORM_FLAGS if k in args))
        extra = [f"{k}={v}" for k, v in grid.items() if k.replace("-", "_") not in TASK_FLAGS + NORM_FLAGS]
        # finished: results.json reached --total-steps; an export of a killed run has none and is counted, not scored
        finished = bool(res and res.get("evals") and res["evals"][-1][0] >= args.get("total_steps", 0))
        evals = [e[2] for e in res["evals"]] if finished else []  # [step, return, normalized score] per evaluation
        final = (res or {}).get("final_eval") if finished else None
        curves: dict = {}
        if os.path.exists(os.path.join(d, "curves.csv")):
            with open(os.path.join(d, "curves.csv")) as fh:
                for row in csv.DictReader(fh):
                    curves.setdefault(row["tag"], []).append((int(row["step"]), float(row["value"])))
        runs.append(dict(dir=d, name=os.path.basename(d), task=task, variant=args.get("variant"), seed=args.get("seed"),
                         method=" ".join([args.get("variant", "?"), *extra]), args=args, rec=rec, finished=finished,
                         # the score: the final evaluation (>= 50 episodes, its own seeds); runs that predate it, the last
                         # periodic evaluation (labelled so on the page)
                         score=(final["normalized_score"] if final else evals[-1]) if finished else None,
                         final=final, evals=evals, curves=curves,
                         data_level=(res or {}).get("target_data_normalized_score") if finished else None))
    return runs


def backbone_label(task) -> str:
    """The backbone with how it scales states and rewards; runs that predate the flags used the release's raw inputs."""
    script, norm = task[0], dict(task[5])
    name = {"v2a_iql": "IQL", "v2a_td3bc": "TD3+BC"}.get(script, script)
    if not norm:
        return f"release {name}: raw states and rewards"
    states = "normalized states" if norm.get("normalize_states") else "raw states"
    scale = norm.get("reward_scale", "none")
    rewards = ("raw rewards" if scale in ("none", None) else
               "rewards × 1000 / episode-return range" if scale == "episode-range" else f"reward scale {scale}")
    actor = [f"AWR clip {norm['awr_clip']:g}"] if norm.get("awr_clip", 100.0) != 100.0 else []
    actor += [f"{norm['actor_schedule']} actor lr"] if norm.get("actor_schedule", "cosine") != "cosine" else []
    return f"{name}: {', '.join([states, rewards, *actor])}"


def task_label(task) -> str:
    script, env, tsize, source, ssize, _ = task
    return f"{env}, {backbone_label(task)}; target {tsize:,}" + (f"; source {source}" if source else "")


def task_slug(task) -> str:
    script, env, tsize, source, ssize, norm = task
    return (f"{env}_{script.replace('v2a_', '')}_t{tsize}" + (f"_{zlib.crc32(source.encode()) % 10**6}" if source else "")
            + (f"_n{zlib.crc32(repr(norm).encode()) % 10**4}" if norm else ""))


def method_order(m: str) -> tuple:
    v = m.split(" ")[0]
    order = VARIANTS + ["bc"]
    return (order.index(v) if v in order else len(order), m)


def variant_of(m: str) -> str:
    return m.split(" ")[0]


def tail_score(r: dict, k: int) -> float:
    """The mean of a finished run's last k periodic evaluations."""
    return float(np.mean(r["evals"][-k:]))


def compared_pairs(methods: list[str]) -> list[tuple[str, str]]:
    """The pairwise comparisons a table reports, the family of its Bonferroni correction: P(V2A > X) for every v2a method
    and every other method, and the paper's ranking steps that do not involve V2A (dvdf > igdf, igdf > merged)."""
    pairs = [(a, b) for a in methods if variant_of(a) == "v2a" for b in methods if variant_of(b) != "v2a"]
    for suffix in sorted({m.partition(" ")[2] for m in methods}):
        names = [" ".join(filter(None, [v, suffix])) for v in RANKING]
        pairs += [(a, b) for a, b in zip(names[1:], names[2:]) if a in methods and b in methods]
    return pairs


def claims(present: set) -> list[tuple[str, str]]:
    """The claims a table tests, for the methods it has runs of: each step of V2A > DVDF > IGDF > merged, V2A > target
    only and V2A > BC (per group of grid flags)."""
    out = []
    for suffix in sorted({m.partition(" ")[2] for m in present}):
        names = [" ".join(filter(None, [v, suffix])) for v in RANKING]
        out += [(a, b) for a, b in zip(names, names[1:]) if a in present and b in present]
        out += [(names[0], b) for b in (" ".join(filter(None, [x, suffix])) for x in (BASELINE, "bc"))
                if names[0] in present and b in present]
    return out


def task_stats(runs: list[dict], reps: int, poi_reps: int, seed: int, score: Callable = lambda r: r["score"]) -> dict:
    """Per method: n, mean, standard error, range and, with MIN_SEEDS finished seeds or more, IQM, mean and optimality
    gap with 95 % stratified-bootstrap CIs (rliable) of `score` over the finished runs; per compared pair with MIN_SEEDS
    seeds each: the probability of improvement with its CI at 1 - ALPHA / k (k: the pairs compared)."""
    from rliable import library, metrics
    from scipy import stats
    warnings.filterwarnings("ignore", category=FutureWarning, module="arch")  # rliable 1.2 passes arch's random_state

    scores = {}
    for r in runs:
        if r["finished"]:
            scores.setdefault(r["method"], []).append(score(r))
    out = {"methods": {}, "poi": {}}
    rs = np.random.RandomState(seed)
    aggregates = lambda v: np.array([metrics.aggregate_iqm(v), metrics.aggregate_mean(v),  # noqa: E731
                                     metrics.aggregate_optimality_gap(v, EXPERT)])
    for m, s in sorted(scores.items(), key=lambda kv: method_order(kv[0])):
        x = np.asarray(s, float)
        out["methods"][m] = dict(n=len(x), mean=float(x.mean()), se=float(x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1
                                 else float("nan"), lo=float(x.min()), hi=float(x.max()), scores=x.tolist())
        if len(x) >= MIN_SEEDS:
            np.random.seed(rs.randint(2**31))  # rliable's stratified resampling draws from NumPy's global RNG too
            pt, ci = library.get_interval_estimates({m: x[:, None]}, aggregates, reps=reps, random_state=rs)
            out["methods"][m].update(iqm=float(pt[m][0]), iqm_ci=[float(ci[m][0][0]), float(ci[m][1][0])],
                                     agg=pt[m].tolist(), agg_ci=ci[m].tolist())
    testable = [(a, b) for a, b in compared_pairs(list(out["methods"]))
                if min(out["methods"][a]["n"], out["methods"][b]["n"]) >= MIN_SEEDS]
    out["k"], out["level"] = len(testable), 1 - ALPHA / max(1, len(testable))
    for a, b in testable:
        x, y = (np.asarray(scores[k], float)[:, None] for k in (a, b))
        # rliable's independent-samples bootstrap (two score arrays) ignores random_state and draws its indices from
        # NumPy's global RNG: seed that from rs, or these CIs change from one regeneration to the next
        np.random.seed(rs.randint(2**31))
        p, ci = library.get_interval_estimates({"p": (x, y)}, metrics.probability_of_improvement, reps=poi_reps,
                                               confidence_interval_size=out["level"], random_state=rs)
        # the check on the bootstrap, which is liberal with few seeds: the Mann-Whitney U test of the same P = 0.5
        u = stats.mannwhitneyu(x[:, 0], y[:, 0], alternative="two-sided", method="auto")
        out["poi"][(a, b)] = dict(p=float(np.squeeze(p["p"])), ci=[float(np.squeeze(ci["p"][0])),
                                                                  float(np.squeeze(ci["p"][1]))], u_p=float(u.pvalue))
    ordered, running = sorted(out["poi"].values(), key=lambda v: v["u_p"]), 0.0
    for i, v in enumerate(ordered):  # Holm-Bonferroni over the same family
        running = max(running, min(1.0, (len(ordered) - i) * v["u_p"]))
        v["u_holm"] = running
    return out


def point(s: dict) -> float:
    """A method's level: the IQM with MIN_SEEDS seeds or more, else the mean."""
    return s["iqm"] if "iqm" in s else s["mean"]


def verdict(stats: dict, a: str, b: str) -> tuple[str, str]:
    """('holds' | 'reversed' | 'not resolved' | 'not testable', its line) for the claim a > b."""
    ms = stats["methods"]
    if (a, b) not in stats["poi"]:
        have = ", ".join(f"{m}: {ms[m]['n'] if m in ms else 0}" for m in (a, b))
        return "not testable", (f"not testable (finished seeds {have}; the rule needs {MIN_SEEDS} of each)")
    poi = stats["poi"][(a, b)]
    p, (lo, hi), holm = poi["p"], poi["ci"], poi["u_holm"]
    state = "holds" if lo > 0.5 else "reversed" if hi < 0.5 else "not resolved"
    text = {"holds": "**holds**", "reversed": f"**reversed** (`{b}` > `{a}` holds)",
            "not resolved": "not resolved (the CI includes 0.5)"}[state]
    check = ("; the Mann-Whitney test agrees" if (holm < ALPHA) == (state != "not resolved") else
             "; **the Mann-Whitney test does not confirm it**" if holm >= ALPHA else "; the Mann-Whitney test rejects P = 0.5")
    return state, (f"{text}: P({a} > {b}) = {p:.2f} [{lo:.2f}, {hi:.2f}]; Mann-Whitney p = {poi['u_p']:.3f}, "
                   f"Holm-adjusted {holm:.3f}{check}; IQM {ms[a]['iqm']:.1f} against {ms[b]['iqm']:.1f}")


def claim_lines(stats: dict, present: set) -> list[str]:
    """The table's claims by the verdict rule, the paper's ranking (every step must hold), and the relative difference
    of the means against the paper's gains."""
    lines, ms, states = [], stats["methods"], {}
    for a, b in claims(present):
        states[(a, b)], text = verdict(stats, a, b)
        lines.append(f"- `{a}` > `{b}`: {text}")
    for suffix in sorted({m.partition(" ")[2] for m in present}):
        names = [" ".join(filter(None, [v, suffix])) for v in RANKING]
        steps = [states.get((a, b)) for a, b in zip(names, names[1:])]
        if all(s is not None for s in steps):
            held = sum(s == "holds" for s in steps)
            ranking = ("**holds** (every step holds)" if held == len(steps) else
                       "not testable" if "not testable" in steps else f"does not hold ({held} of {len(steps)} steps hold)")
            lines.append(f"- the ranking {' > '.join(f'`{n}`' for n in names)}: {ranking}")
        for b, paper in [*PAPER_GAIN.items(), (BASELINE, None), ("bc", None)]:
            a, bb = names[0], " ".join(filter(None, [b, suffix]))
            if a in ms and bb in ms and ms[bb]["mean"]:
                gain = 100 * (ms[a]["mean"] - ms[bb]["mean"]) / abs(ms[bb]["mean"])
                lines.append(f"- mean of `{a}` (n={ms[a]['n']}) relative to `{bb}` (n={ms[bb]['n']}): {gain:+.1f} %"
                             + (f" (paper: +{paper} %)" if paper is not None else ""))
    return lines


def anchors(truns: list[dict], st: dict) -> dict:
    """The levels a table is read against: the target data's own score (from the runs' results.json), BC's (the bc
    variant's level) and the expert's (100)."""
    levels = sorted({round(r["data_level"], 6) for r in truns if r.get("data_level") is not None})
    bc = [(m, s) for m, s in st["methods"].items() if variant_of(m) == "bc"]
    return dict(data=float(np.mean(levels)) if levels else None, bc=point(bc[0][1]) if bc else None,
                bc_n=bc[0][1]["n"] if bc else 0, expert=EXPERT)


def anchor_line(a: dict) -> str:
    data = (f"target data {a['data']:.1f}" if a["data"] is not None else
            "target data: not on record for these runs (their results.json predates it)")
    bc = (f"BC {a['bc']:.1f} ({'IQM' if a['bc_n'] >= MIN_SEEDS else 'mean'} of {a['bc_n']} seeds)" if a["bc"] is not None
          else "BC: no `bc` runs in this table")
    return f"Anchors: {data} · {bc} · expert {a['expert']:.0f}."


def score_protocol(truns: list[dict]) -> str:
    fin = [r for r in truns if r["finished"]]
    final = [r for r in fin if r["final"]]
    if final and len(final) == len(fin):
        eps = sorted({r["final"]["episodes"] for r in final})
        return (f"Score: the final evaluation of each run ({'/'.join(map(str, eps))} episodes at the end of stage 5, "
                "with seeds distinct from the periodic evaluations').")
    last = (f"the last periodic evaluation ({'/'.join(map(str, sorted({r['args'].get('eval_episodes') for r in fin})))} "
            "episodes)")
    if not final:
        return f"Score: {last}: these runs predate the final evaluation."
    return (f"Score: the final evaluation where a run has one ({len(final)} runs), else {last} ({len(fin) - len(final)} "
            "runs that predate it): **two protocols in one table**.")


def fmt(x: float, nd: int = 1) -> str:
    return "–" if x is None or not np.isfinite(x) else f"{x:.{nd}f}"


def stat_cells(st: dict, m: str) -> str:
    """The table cells of method m: IQM [95 % CI] | mean ± s.e. (range) | P(V2A > m) [CI] (naming the v2a method when
    the task has several); with fewer than MIN_SEEDS seeds, mean and range only."""
    s, several = st["methods"][m], len({a for a, b in st["poi"] if variant_of(a) == "v2a"}) > 1
    rng = f"range {fmt(s['lo'])}–{fmt(s['hi'])}"
    pois = [f"{p['p']:.2f} [{p['ci'][0]:.2f}, {p['ci'][1]:.2f}]" + (f" ({a})" if several else "")
            for (a, b), p in st["poi"].items() if b == m and variant_of(a) == "v2a"]
    if s["n"] < MIN_SEEDS:
        return f"– (n < {MIN_SEEDS}) | {fmt(s['mean'])} ({rng}) | –"
    return (f"{fmt(s['iqm'])} [{fmt(s['iqm_ci'][0])}, {fmt(s['iqm_ci'][1])}] | {fmt(s['mean'])} ± {fmt(s['se'])} ({rng}) | "
            f"{'; '.join(pois) or '–'}")


def poi_header(st: dict) -> str:
    return f"P(V2A > method) [{level_text(st).split(' (')[0]} CI]" if st["k"] else "P(V2A > method)"


def level_text(st: dict) -> str:
    return (f"{100 * st['level']:.2f}".rstrip("0").rstrip(".") + f" % (Bonferroni over the {st['k']} comparisons of this "
            "table)" if st["k"] else "–")


def mean_ci(values: np.ndarray, rs: np.random.RandomState, reps: int = 2000):
    """Mean over seeds and its 95 % percentile-bootstrap CI (columns: steps)."""
    boots = values[rs.randint(len(values), size=(reps, len(values)))].mean(1)
    return values.mean(0), np.percentile(boots, 2.5, axis=0), np.percentile(boots, 97.5, axis=0)


def on_common_steps(curves: list[dict]) -> tuple[list, np.ndarray]:
    """Curves ({step: value}, one per run) on the steps that all of them reached: (steps, values [runs, steps])."""
    steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
    return steps, np.array([[c[s] for s in steps] for c in curves])


def reference_lines(ax, a: dict, vertical: bool = False):
    """The anchors as dashed lines: the target data's level, BC's, the expert's (100)."""
    line = ax.axvline if vertical else ax.axhline
    for value, label, colour in ((a["data"], "target data", "0.45"), (a["bc"], "BC", "C7"), (a["expert"], "expert", "k")):
        if value is not None:
            line(value, ls="--", lw=1, color=colour, label=f"{label} ({value:.1f})")


def pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_task_figures(task, truns: list[dict], st: dict, anc: dict, folder: str, seed: int) -> list[tuple[str, str]]:
    """The figures of a table: the score of every seed (strip plot), rliable's interval estimates (IQM, mean,
    optimality gap) and probabilities of improvement, and the learning curves (every seed thin, the mean over seeds
    with its CI), with the anchors as reference lines. Returns (file name, caption) per figure made."""
    from rliable import plot_utils
    plt, slug, made = pyplot(), task_slug(task), []
    fin = [r for r in truns if r["finished"]]
    methods = sorted({r["method"] for r in fin}, key=method_order)

    def save(fig, name: str, caption: str, tight: bool = False):
        fig.tight_layout()  # rliable's figures write their axis label outside the axes: tight bounding box for those
        fig.savefig(os.path.join(folder, f"{name}_{slug}.png"), dpi=110, bbox_inches="tight" if tight else None)
        plt.close(fig)
        made.append((f"{name}_{slug}.png", caption))

    if methods:
        fig, ax = plt.subplots(figsize=(1.2 * len(methods) + 3.5, 4))
        jitter = np.random.RandomState(seed)
        for i, m in enumerate(methods):
            s = st["methods"][m]
            ax.scatter(i + jitter.uniform(-0.12, 0.12, s["n"]), s["scores"], s=22, color=f"C{i}", zorder=3)
            ax.plot([i - 0.3, i + 0.3], [point(s)] * 2, color=f"C{i}", lw=2)
        reference_lines(ax, anc)
        ax.set_xticks(range(len(methods)), [f"{m}\n(n={st['methods'][m]['n']})" for m in methods], fontsize=8)
        ax.set(ylabel="normalized score (the table's score)", xlabel="method", title=task_label(task).split(";")[0])
        ax.legend(fontsize=7, loc="best")
        save(fig, "scores", "The score of every finished seed (dots) and each method's level (bar: the IQM with "
             f"{MIN_SEEDS} seeds or more, else the mean), against the anchors (dashed).")
    ci_methods = [m for m in methods if "agg" in st["methods"][m]]
    if ci_methods:
        pts = {m: np.array(st["methods"][m]["agg"]) for m in ci_methods}
        cis = {m: np.array(st["methods"][m]["agg_ci"]) for m in ci_methods}
        fig, _ = plot_utils.plot_interval_estimates(pts, cis, metric_names=["IQM", "Mean", "Optimality gap"],
                                                    algorithms=ci_methods, xlabel="normalized score",
                                                    subfigure_width=3.4, row_height=0.5)
        made_note = ", ".join(m for m in methods if m not in ci_methods)
        save(fig, "intervals", f"IQM, mean and optimality gap (the mean shortfall below the expert's {EXPERT:.0f}) "
             "with their 95 % stratified-bootstrap CIs (rliable), for the methods with "
             f"{MIN_SEEDS} finished seeds or more" + (f" (not {made_note})." if made_note else "."), tight=True)
    if st["poi"]:
        probs = {f"{a},{b}": np.array(p["p"]) for (a, b), p in st["poi"].items()}
        cis = {f"{a},{b}": np.array(p["ci"]) for (a, b), p in st["poi"].items()}
        fig, ax = plt.subplots(figsize=(4.5, 0.45 * len(probs) + 1.2))
        plot_utils.plot_probability_of_improvement(probs, cis, ax=ax, xlabel="P(X > Y)")
        ax.axvline(0.5, ls="--", lw=1, color="k")
        save(fig, "poi", f"P(X > Y), the probability that a run of X scores above a run of Y, with its "
             f"{level_text(st)} stratified-bootstrap CI; a claim X > Y holds when the whole interval lies right of 0.5 "
             "(dashed).", tight=True)
    rs = np.random.RandomState(seed)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    drew = False
    for i, m in enumerate(methods):
        steps, v = on_common_steps([dict(r["curves"].get("eval/normalized_score", [])) for r in fin if r["method"] == m])
        if not steps:
            continue
        for row in v:
            ax.plot(steps, row, color=f"C{i}", lw=0.6, alpha=0.35)
        mu, lo, hi = mean_ci(v, rs)
        ax.plot(steps, mu, color=f"C{i}", lw=2, label=f"{m} (n={len(v)})")
        ax.fill_between(steps, lo, hi, color=f"C{i}", alpha=0.15)
        drew = True
    if drew:
        reference_lines(ax, anc)
        ax.set(xlabel="stage-5 gradient steps", ylabel="normalized score (periodic evaluations)",
               title=task_label(task).split(";")[0])
        ax.legend(fontsize=7, ncol=2)
        save(fig, "curves", "The periodic evaluations over stage 5: every seed (thin) and the mean over seeds (thick) "
             "with its 95 % percentile-bootstrap CI (shaded), on the steps that every finished run of a method reached; "
             "the anchors dashed.")
    else:
        plt.close(fig)
    return made


def central_range(hists: list, lo: float = 0.01, hi: float = 0.99) -> tuple[float, float]:
    """The lo and hi quantiles of pooled histograms given as (right bucket edge, count) pairs."""
    edges, counts = np.array(sorted(p for h in hists for p in h)).T
    cdf = np.cumsum(counts) / counts.sum()
    a, b = edges[np.searchsorted(cdf, lo, side="right")], edges[min(np.searchsorted(cdf, hi), len(edges) - 1)]
    pad = 0.05 * (b - a) or 1.0
    return float(a - pad), float(b + pad)


def stage1_caption(runs: list[dict]) -> str:
    """What the stage-1 curves show, read off them: the loss's level early and late, its spikes (a point well above
    its neighbours' median), and the domain probe at the last check."""
    parts, spikes, late = [], [], []
    firsts, lasts = [], []
    for r in runs:
        pts = r["curves"].get("repr/rec_loss", [])
        if len(pts) < 12:
            continue
        v = np.array([p[1] for p in pts])
        tenth = max(1, len(v) // 10)
        firsts.append(np.median(v[:tenth]))
        lasts.append(np.median(v[-tenth:]))
        ratio = [v[i] / np.median(np.delete(v[max(0, i - 5): i + 6], min(i, 5))) for i in range(len(v))]
        spikes.append(max(ratio))
        if ratio[-1] > 1.5:
            late.append(f"{r['method']} s{r['seed']}")
    span = lambda v, f: f"{min(v):{f}}" if f"{min(v):{f}}" == f"{max(v):{f}}" else f"{min(v):{f}}–{max(v):{f}}"  # noqa: E731
    if firsts:
        parts.append(f"the reconstruction loss (log scale) goes from {span(firsts, '.3g')} over the first tenth of the "
                     f"logged iterations to {span(lasts, '.3g')} over the last tenth (per-seed medians); the largest spike "
                     f"of a seed is {span(spikes, '.1f')}× the median of its neighbours ({sum(s >= 2 for s in spikes)} of "
                     f"{len(spikes)} seeds reach 2×)")
        if late:
            parts.append(f"at the last logged iteration the loss is still on a spike in {', '.join(late)}")
    tag = "repr/stage1_domain_probe_acc"
    probe = [r["curves"][tag][-1][1] for r in runs if r["curves"].get(tag)]
    if probe:
        parts.append(f"the held-out domain probe on z reads {span(probe, '.2f')} at the last check")
    return ("Stage 1 over its iterations, every seed: " + "; ".join(parts) + "." if parts else
            "Stage 1 over its iterations, every seed: the TC-ELBO reconstruction loss and the held-out domain probe on z.")


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
    if stage1:  # has stage 1 trained long enough? (the --repr-steps budget)
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
        save(fig, "stage1", stage1_caption(stage1))
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



def say(msg: str):
    print(f"[report] {msg}", flush=True)


def doc_link(page: str) -> str:
    """docs/benchmark.md's verdict rule, linked from a page."""
    return os.path.relpath(os.path.join(ROOT, "docs", "benchmark.md"), os.path.dirname(os.path.abspath(page))) + \
        "#the-verdict-rule"


def rule_lines(cfg: "Report", page: str) -> list[str]:
    return [f"**The verdict rule** ([docs/benchmark.md]({doc_link(page)}), fixed before the runs, applied "
            "to every table below the same way). *Score:* the final evaluation of each finished run (at least 50 "
            "episodes, its own seeds); runs that predate it are scored by their last periodic evaluation, and their table "
            "says so. Normalized score: 100 · (return − ref_min) / (ref_max − ref_min) with reference returns measured in "
            "our own target envs (not comparable with D4RL). *Statistics* (rliable): IQM (interquartile mean) with its 95 % "
            f"stratified-bootstrap percentile CI ({cfg.reps} replications); P(X > Y), the probability that a run of X "
            f"scores above a run of Y (Mann-Whitney), with a stratified-bootstrap CI ({cfg.poi_reps} replications) at "
            "1 − 0.05 / k, k the pairwise comparisons the table reports (Bonferroni: a family-wise error of 5 % for the "
            "table). *A claim X > Y holds* when that CI lies above 0.5, is *reversed* when it lies below, and is *not "
            "resolved* otherwise; the IQMs are descriptive. *The ranking* V2A > DVDF > IGDF > merged holds when each of "
            "its three steps holds. *Check:* each claim also gives the two-sided Mann-Whitney U test of P = 0.5 (exact for "
            "fewer than 8 seeds a method, without ties), Holm-adjusted over the same family; where it disagrees with the "
            "CI, the line says so (with 5 seeds the percentile bootstrap is the more liberal of the two). *Seeds:* a method "
            f"with fewer than {MIN_SEEDS} finished seeds gets its mean and range "
            "(min–max) only, no IQM, CI or verdict.", ""]


def report(cfg: "Report") -> dict:
    sweep = os.path.basename(cfg.sweep.rstrip("/"))
    runs_dir, res_dir = os.path.join(cfg.runs_root, sweep), os.path.join(cfg.results_root, sweep)
    if cfg.export and os.path.isdir(runs_dir):
        say(f"exporting {runs_dir}/ to {res_dir}/")
        for d in sorted(glob.glob(os.path.join(runs_dir, "*", ""))):
            export_run(d, os.path.join(res_dir, os.path.basename(d.rstrip("/"))))
    say(f"reading runs from {res_dir}/")
    runs = load_runs(res_dir)
    say(f"{len(runs)} runs: {sum(r['finished'] for r in runs)} finished, {sum(not r['finished'] for r in runs)} "
        "unfinished (counted, not scored)")
    page, figures = os.path.join(cfg.pages, f"{sweep}.md"), os.path.join(cfg.pages, sweep)
    os.makedirs(figures, exist_ok=True)
    tasks: dict = {}
    for r in runs:
        tasks.setdefault(r["task"], []).append(r)
    fig_rel = os.path.relpath(figures, os.path.dirname(os.path.abspath(page)))
    L = [f"# Results: sweep `{sweep}`", "",
         f"Generated by `python benchmark.py report --sweep {sweep}` from the exported runs in `{res_dir}/` "
         "(args.json, results.json, curves.csv of every run); do not edit by hand, regenerate.", ""]
    warnings_at_top = len(L)
    L += rule_lines(cfg, page)
    stats_all, made, top = {}, [], []
    if not runs:
        L += [f"**No runs exported yet** under `{res_dir}/`. Start the sweep (docs/benchmark.md), then regenerate.", ""]
    for task, truns in sorted(tasks.items(), key=lambda kv: str(kv[0])):
        say(f"{task_label(task)}: bootstrap ({cfg.reps} replications for the IQMs, {cfg.poi_reps} for each P(X > Y))")
        st = stats_all[task] = task_stats(truns, cfg.reps, cfg.poi_reps, cfg.seed)
        anc = anchors(truns, st)
        present = {r["method"] for r in truns}
        L += [f"## {task_label(task)}", "", score_protocol(truns), "", anchor_line(anc), "",
              f"| method | seeds finished | unfinished | IQM [95 % CI] | mean ± s.e. (range) | {poi_header(st)} | seeds |",
              "|---|---|---|---|---|---|---|"]
        for m in sorted(present, key=method_order):
            unf = sum(1 for r in truns if r["method"] == m and not r["finished"])
            seeds = sorted(r["seed"] for r in truns if r["method"] == m and r["finished"])
            cells = stat_cells(st, m) if m in st["methods"] else "– | – | –"
            L.append(f"| {m} | {len(seeds)} | {unf} | {cells} | {seeds or '–'} |")
        if lines := claim_lines(st, present):
            L += ["", "Claims (the verdict rule" + (f"; CIs of P at {level_text(st)}" if st["k"] else "") + "):", "", *lines]
        if anc["bc"] is not None:
            learners = {m: point(s) for m, s in st["methods"].items() if variant_of(m) != "bc"}
            if learners and max(learners.values()) < anc["bc"]:
                best = max(learners, key=learners.get)
                top.append(f"**{task_label(task)}: no learner reaches behaviour cloning's level** (BC {anc['bc']:.1f}; "
                           f"the best, `{best}`, {learners[best]:.1f}).")
        say(f"{task_label(task)}: evaluation-noise check (the mean of the last {cfg.tail_evals} periodic evaluations)")
        st["tail"] = task_stats(truns, cfg.reps, cfg.poi_reps, cfg.seed, lambda r: tail_score(r, cfg.tail_evals))
        L += ["", *tail_lines(cfg.tail_evals, truns, st["tail"]), ""]
        fin = [r for r in truns if r["finished"]]  # the figures show the table's runs
        figs = plot_task_figures(task, truns, st, anc, figures, cfg.seed) + plot_diagnostics(task, fin, figures)
        for f, caption in figs:
            say(f"figure {os.path.join(figures, f)}")
            L += [f"![{f}]({fig_rel}/{f})", "", f"*{caption}*", ""]
        made += [f for f, _ in figs]
    L[warnings_at_top:warnings_at_top] = [*top, ""] if top else []
    reading = os.path.join(res_dir, "reading.md")  # written by hand, kept with the exported runs: regenerating keeps it
    L += ["## Reading", ""]
    if os.path.exists(reading):
        with open(reading) as fh:
            L += [f"(From `{reading}`, written by hand for the runs above.)", "", fh.read().strip(), ""]
    else:
        L += ["> **TODO (lead): interpretation.** What the numbers do and do not show: which claims hold by the verdict "
              "rule (above), the gains against the paper's +13.7 % (DVDF) and +21.4 % (IGDF), and where the ranking does "
              "not appear, what the diagnostics (z separation, advantage distributions, kept fractions) say about why. "
              f"Write it to `{reading}`; the report includes it.", ""]
    L += setup_lines(runs)
    for stale in sorted(set(os.listdir(figures)) - set(made)):  # this sweep's folder: nothing else writes there
        if stale.endswith(".png"):
            say(f"removing {os.path.join(figures, stale)} (no longer made)")
            os.remove(os.path.join(figures, stale))
    with open(page, "w") as fh:
        fh.write("\n".join(L))
    say(f"wrote {page} and {len(made)} figures in {figures}/ ({len(runs)} runs, {len(tasks)} tables)")
    if cfg.index:
        write_index(cfg.pages, cfg.index)
        say(f"wrote {cfg.index} (the index of the pages in {cfg.pages}/)")
    return stats_all


def write_index(pages: str, index: str):
    """The index of the results pages: one line per page that `report` made in `pages`, with its tables."""
    rows = []
    for path in sorted(glob.glob(os.path.join(pages, "*.md"))):
        with open(path) as fh:
            lines = fh.read().splitlines()
        if not lines or not lines[0].startswith("# Results: sweep `"):
            continue
        tables = [x[3:] for x in lines if x.startswith("## ") and x[3:] not in REPORT_SECTIONS]
        notes = [x for x in lines[:12] if x.startswith("**") and "no learner reaches" in x]
        rel = os.path.relpath(path, os.path.dirname(os.path.abspath(index)))
        head = f"- **[{lines[0].split('`')[1]}]({rel})**" + ("" if tables else ": no runs yet")
        rows += [head + "".join(f" {n}" for n in notes), *[f"  - {t}" for t in tables]]
    L = ["# Results", "", "One page per sweep, each generated by `python benchmark.py report --sweep <name>` from the "
         "exported runs in `results/<name>/`, with its figures in a folder of the same name; this index is regenerated "
         "with every report, from the pages that exist. How the runs are scored and when a claim holds: "
         f"[the verdict rule]({doc_link(index)}).", "", *rows, ""]
    os.makedirs(os.path.dirname(os.path.abspath(index)), exist_ok=True)
    with open(index, "w") as fh:
        fh.write("\n".join(L))


def tail_lines(k: int, truns: list[dict], tail: dict) -> list[str]:
    """The check of evaluation noise: `tail`, the statistics of each run's mean over its last k periodic evaluations, as
    a table with the spread of those evaluations within a run, and its claims by the same rule."""
    L = [f"**Evaluation noise.** The same statistics and rule with each run scored by the mean of its last {k} periodic "
         "evaluations (a check, not the score); sd within a run: the standard deviation of those "
         f"{k} evaluations, mean over the seeds.", "",
         f"| method | mean of last {k}: IQM [95 % CI] | mean ± s.e. (range) | {poi_header(tail)} | sd within a run |",
         "|---|---|---|---|---|"]
    for m in tail["methods"]:
        sds = [float(np.std(r["evals"][-k:], ddof=1)) for r in truns if r["method"] == m and r["finished"]
               and len(r["evals"]) > 1]
        L.append(f"| {m} | {stat_cells(tail, m)} | {fmt(float(np.mean(sds))) if sds else '–'} |")
    if lines := claim_lines(tail, {r["method"] for r in truns}):
        level = f" (CIs of P at {level_text(tail)})" if tail["k"] else ""
        L += ["", f"Claims by the mean of the last {k} periodic evaluations{level}:", "", *lines]
    return L


def elide_paths(command: str) -> str:
    """A launching command without the machine's paths: --runs-root and --results-root given as absolute paths are
    dropped (the defaults, relative to the repository, hold the same runs), any other absolute path keeps its name."""
    words, out, skip = shlex.split(command), [], False
    for i, w in enumerate(words):
        if skip:
            skip = False
            continue
        flag, _, value = w.partition("=")
        if flag in ("--runs-root", "--results-root", "--runs_root", "--results_root"):
            if value and os.path.isabs(value):
                continue
            if not value and i + 1 < len(words) and os.path.isabs(words[i + 1]):
                skip = True
                continue
        out.append(f"{flag}=<path>/{os.path.basename(value)}" if value and os.path.isabs(value) else
                   f"<path>/{os.path.basename(w)}" if os.path.isabs(w) else w)
    return " ".join(map(shlex.quote, out)).replace("'<path>/", "<path>/")


def concurrency(attempts: list[dict]) -> int:
    """The most attempts running at the same time on one machine."""
    events = sorted((t, d) for a in attempts if a.get("end") for t, d in ((a["start"], 1), (a["end"], -1)))
    now = most = 0
    for _, d in events:
        now += d
        most = max(most, now)
    return most


def setup_lines(runs: list[dict]) -> list[str]:
    """Commands, budgets and backbones, machines, code and wall time, from the exported records."""
    L = ["## Setup", "", "Commands (as launched, the machine's paths elided; re-launching one continues its sweep):", "",
         "```bash"]
    L += sorted({elide_paths(r["rec"].get("spec", {}).get("launch", "?")) for r in runs}) or ["# none yet"]
    L += ["```", ""]
    budget_keys = ("repr_steps", "sql_steps", "info_steps", "total_steps", "eval_freq", "eval_episodes")
    budgets: dict = {}
    for r in runs:
        b = {k: r["args"].get(k) for k in budget_keys}
        b.update({k: r["args"][k] for k in NORM_FLAGS if k in r["args"]})  # where they differ between tables: shown
        budgets.setdefault(json.dumps(b), set()).add(backbone_label(r["task"]))
    L += ["Budgets and input scaling (normalisation flags absent: runs that predate them):", ""]
    L += [f"- {', '.join(sorted(names))}: `{b}`" for b, names in sorted(budgets.items())] or ["- –"]
    L += [""]
    attempts = [a for r in runs for a in r["rec"].get("attempts", [])]
    hosts: dict = {}
    for a in attempts:
        hosts.setdefault((a["machine"]["host"], a["machine"]["cpu"], a["machine"]["cores"]), []).append(a)
    machines = [f"{h} ({cpu}, {cores} cores; up to {concurrency(aa)} of this sweep's runs at a time)"
                for (h, cpu, cores), aa in sorted(hosts.items())]
    L += ["Machines: " + ("; ".join(machines) or "–") + ". One CPU thread per run (OMP_NUM_THREADS=1).", ""]
    codes: dict = {}
    for r in runs:
        for a in r["rec"].get("attempts", []):
            at_end = a["start"] < CODE_AT_START_SINCE
            who = (backbone_label(r["task"]).split(":")[0].removeprefix("release "), method_order(r["method"]), r["seed"])
            codes.setdefault(a.get("code") or "not recorded", set()).add((*who, " †" * at_end))
    L += ["Code (the git commit of the training scripts recorded with each attempt; the runs that used it):", ""]
    L += [f"- `{c[:7] if c != 'not recorded' else c}{'+modified' * c.endswith('+modified')}`: "
          f"{', '.join(f'{b} {m} s{seed}{mark}' for b, (_, m), seed, mark in sorted(names))}"
          for c, names in sorted(codes.items())]
    if any(n[3] for names in codes.values() for n in names):
        L += ["", "† Recorded when the attempt ended, not when it started: runners before commit 4b8be74 (2026-11-26 "
              "14:54 UTC) read the checkout's commit at an attempt's end, and these attempts started before it, so the "
              "commit named may postdate the code they ran (e.g. an attempt from 13:20 to 16:02 UTC names 4b8be74). The "
              "code each of them started with is not on record."]
    L += [""]
    if runs:
        L += ["| method | table | seeds (finished) | wall time per finished run, h: mean [min, max] | process-hours |",
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
        shared = "; ".join(f"{cores}-core {h} shared by up to {concurrency(aa)} runs"
                           for (h, _, cores), aa in sorted(hosts.items()))
        L += ["", f"Process-hours (one thread each, {shared}): the wall-clock hours of the runs' processes, summed over "
              f"all attempts, finished or not: {total:.1f}. Not core-hours of a dedicated machine.", ""]
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
