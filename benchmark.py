# Sweep runner and results report for the V2A training scripts (docs/benchmark.md).
#   python benchmark.py run --sweep hopper --variants v2a dvdf igdf merged target --seeds 1 2 3 4 5 -- --total-steps 300000
#   python benchmark.py report --sweep hopper        # -> docs/results/hopper.md, docs/results/hopper/*.png
# A run is one process of a training script with one CPU thread (or one GPU), in its own folder runs/<sweep>/<run name>/;
# the training script is started there, so its run directory is runs/<sweep>/<run name>/runs/<env>__...__<time>/.
# Re-launching skips finished runs and continues unfinished ones with the script's --resume. The training scripts do not
# import ray, rliable or matplotlib; this file imports ray only with --ray-address, and the report (v2a_utils/report.py,
# which imports rliable/matplotlib) only in report.
import ast
import difflib
import glob
import importlib.util
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
import typing
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, fields
from typing import Optional

import numpy as np
import tyro

from v2a_utils.exports import export_run, read_json, trainer_dir, write_json
from v2a_utils.flags import flag_error
from v2a_utils.processes import child_error, datasets_root, pid_alive
from v2a_utils.repository import ROOT, code_version
from v2a_utils.verdict import VARIANTS

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


def script_args(path: str):
    """The flags of a training script: its dataclass `Args`, imported from the file (its `__main__` block does not run).
    None for a script without a top-level `class Args` (read from its source first, so that nothing of such a script
    runs): its flags are its own, and only what the runner sets is checked."""
    with open(path) as fh:
        tree = ast.parse(fh.read(), path)
    if not any(isinstance(n, ast.ClassDef) and n.name == "Args" for n in tree.body):
        return None
    spec = importlib.util.spec_from_file_location(f"benchmark_checks_{os.path.basename(path)[:-3]}", path)
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # registered: tyro reads its source
    sys.path.insert(0, os.path.dirname(path))  # the script's own imports (v2a_utils, ...) sit beside it
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(os.path.dirname(path))
    return getattr(module, "Args", None)


def sweep_problems(cfg: Run, extra: list[str]) -> list[str]:
    """Everything `run` can check before it starts anything (--dry-run included), one line per problem: --workers,
    --seeds, the scripts, and for each script with a dataclass Args (script_args) --variants, the --grid flags and the
    flags after `--` against its own flags, then every run's whole command line as the script parses it (values of
    the wrong type, also where a flag given twice overrides it)."""
    problems = []
    if cfg.workers < 1:
        problems.append(f"--workers {cfg.workers}: must be at least 1 (the runs at a time)")
    if bad := [s for s in cfg.seeds if not 0 <= s < 2**31]:
        problems.append(f"--seeds {' '.join(map(str, bad))}: a seed lies in [0, 2^31), as the scripts' --seed")
    for script in dict.fromkeys(cfg.scripts):
        path = script_path(script)
        if not os.path.exists(path):
            problems.append(f"no training script {path}")
            continue
        args_type, name = script_args(path), os.path.basename(path)
        if args_type is None:
            continue
        names = {f.name.replace("_", "-") for f in fields(args_type)}
        known = lambda flag: flag in names or flag.startswith("no-") and flag[3:] in names  # a boolean's --no-flag
        hint = lambda flag: "".join(f" (perhaps --{m})" for m in difflib.get_close_matches(flag, names, 1))
        own = len(problems)
        choices = typing.get_args(typing.get_type_hints(args_type).get("variant"))
        if choices and (bad := [v for v in cfg.variants if v not in choices]):
            problems.append(f"--variants {' '.join(bad)}: {name} has no such --variant; it takes {', '.join(choices)}")
        for g in cfg.grid:
            flag = g.partition("=")[0].replace("_", "-")
            if not known(flag):
                problems.append(f"--grid {g}: {name} has no flag --{flag}{hint(flag)}")
        for a in extra:
            flag = a[2:].partition("=")[0].replace("_", "-")
            if a.startswith("--") and not known(flag):
                problems.append(f"{a} after `--`: {name} has no such flag{hint(flag)}")
        if len(problems) == own:  # the names hold: each run's command line, as the script will parse it
            try:
                runs = [s for s in make_specs(cfg, extra) if s["script"] == path]
            except SystemExit as e:
                problems.append(str(e).removeprefix("benchmark.py: error: "))
                continue
            errors = [flag_error(args_type, s["argv"])[1] for s in runs]
            problems += [f"{name}: {e}" for e in errors if e]
    return list(dict.fromkeys(problems))  # each once: many runs share a problem


# ---- One run: its state, its process, its record ---------------------------------------------------------------------
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
    if (results or {}).get("filter_only"):  # --filter-only: stages 1-4 and the filter's accuracy are all it does
        return True
    evals = (results or {}).get("evals")
    want = flag_value(spec["argv"], "total-steps")
    return bool(evals) and (want is None or evals[-1][0] >= int(want))


def exported_done(spec: dict) -> bool:
    """A finished run exported under the results root with the same flags, and no run folder here: a fresh clone (or
    another machine) continues a sweep from its committed results instead of training those runs again."""
    if not spec.get("export_dir"):
        return False
    record, res = (read_json(os.path.join(spec["export_dir"], f)) for f in ("run.json", "results.json"))
    if not record or not res or not (res.get("evals") or res.get("filter_only")):
        return False
    if record.get("spec", {}).get("argv") != spec["argv"]:
        print(f"[benchmark] {spec['name']}: the export under {spec['export_dir']} was made with other flags "
              f"({' '.join(record.get('spec', {}).get('argv', []))}); training the run again overwrites it", flush=True)
        return False
    return reached_total(spec, res)


def machine() -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), cpu)
    except OSError:
        pass
    return dict(host=socket.gethostname(), cpu=cpu, cores=os.cpu_count(), cuda_visible=os.environ.get("CUDA_VISIBLE_DEVICES"))


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


# ---- The sweep: local pool or Ray --------------------------------------------------------------------------------------
def prepare_datasets(specs: list[dict]):
    """data_gen.py once per distinct dataset flags, one after the other (it reuses existing datasets); its failure is
    one line, as a training script reports it (child_error)."""
    seen = set()
    for s in specs:
        data_gen = os.path.join(os.path.dirname(s["script"]), "data_gen.py")
        args = [x for f in DATA_FLAGS if (v := flag_value(s["argv"], f)) is not None for x in (f"--{f}", v)]
        if os.path.exists(data_gen) and (data_gen, *args) not in seen:
            seen.add((data_gen, *args))
            print(f"[benchmark] datasets: python data_gen.py {' '.join(args)}", flush=True)
            env = dict(os.environ, OMP_NUM_THREADS="1")
            proc = subprocess.run([sys.executable, data_gen, *args], cwd=os.path.dirname(data_gen), env=env,
                                  stderr=subprocess.PIPE, text=True)
            if not proc.returncode:
                sys.stderr.write(proc.stderr)  # a note it gave (it waited for another data_gen.py)
                continue
            line, output = child_error(proc.returncode, proc.stderr, datasets_root())
            sys.stderr.write(output)
            raise SystemExit(f"benchmark.py: error: {line}; no run was started")


def run_sweep(cfg: Run, extra: list[str], launch: str = "") -> int:
    if problems := sweep_problems(cfg, extra):  # before anything starts, --dry-run included
        raise SystemExit("\n".join(f"benchmark.py: error: {p}" for p in problems))
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
    results = [r for r in results if r["state"] in ("new", "resume")]  # not those another runner took meanwhile
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
        if self.starts:  # the run that ended is the one whose start time fits its duration best
            began = time.time() - r["seconds"]
            self.starts.remove(min(self.starts, key=lambda t: abs(t - began)))
        if r["state"] in ("done", "running"):  # another runner took it after the plan: no longer this runner's work
            self.total -= 1
            print(f"[benchmark] skipped {r['name']}: another runner {'finished' if r['state'] == 'done' else 'runs'} it",
                  flush=True)
            return
        self.done += 1
        self.failed += r["rc"] != 0
        if r["rc"] == 0:
            self.durations.append(r["seconds"])
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


def main(argv: list[str]) -> int:
    argv_all, extra = list(argv), []
    if "--" in argv:  # everything after `--` goes to every run
        argv, extra = argv[: argv.index("--")], argv[argv.index("--") + 1 :]
    cfg = tyro.extras.subcommand_cli_from_dict({"run": Run, "report": Report}, args=argv,
                                                description="Sweep runner and results report (docs/benchmark.md).")
    if isinstance(cfg, Report):
        if extra:
            raise SystemExit("benchmark.py: error: report takes no flags after `--`")
        sweep = os.path.basename(cfg.sweep.rstrip("/"))
        runs_dir, res_dir = os.path.join(cfg.runs_root, sweep), os.path.join(cfg.results_root, sweep)
        if not glob.glob(os.path.join(runs_dir, "*", "")) and not glob.glob(os.path.join(res_dir, "*", "")):
            raise SystemExit(f"benchmark.py: error: sweep {sweep} has no runs, neither in {runs_dir}/ nor in {res_dir}/: "
                             f"nothing to report (a misspelt --sweep?); no page was written")
        from v2a_utils.report import report  # here: it imports torch and the statistics' libraries, which `run` never needs

        report(cfg)
        return 0
    return run_sweep(cfg, extra, " ".join(map(shlex.quote, ["python", "benchmark.py", *argv_all])))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
