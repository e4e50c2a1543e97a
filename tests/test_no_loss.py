"""No result lost or mixed (issue 34): one writer per run folder, a folder of its own for every run, a full disk as one
line that leaves nothing behind (data generation, checkpoints, results.json), sweeps checked before they start, and
what a fresh machine sees (data_gen.py --help, the docs' snippets, a small sweep's page, the time estimate). The full
disks are small tmpfs mounts: only root may mount one, so those tests are skipped elsewhere (CI may not be root)."""
import errno
import glob
import json
import multiprocessing
import os
import re
import subprocess
import sys
import time
import types

import minari
import pytest
import torch
from conftest import ROOT, SUBPROCESS_TIMEOUT, validate_args
from test_benchmark import fake_export, report_cfg
from test_trust import TINY, refused, train

import benchmark
import data_gen
import v2a_iql
from v2a_utils import flags, report, runs, training


@pytest.fixture
def small_disk(tmp_path):
    """small_disk(size) -> a fresh tmpfs folder of that size ("2m"), unmounted after the test."""
    mounted = []

    def mount(size: str):
        if not sys.platform.startswith("linux") or os.geteuid() != 0:
            pytest.skip("a full disk is a small tmpfs here, and only root may mount one (mount -t tmpfs)")
        folder = tmp_path / f"disk{len(mounted)}"
        folder.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True,
                              text=True)
        if proc.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def fill(folder) -> str:
    """Fills the disk of `folder` with a file, to the last byte it takes; returns the file (remove it to make room)."""
    path = os.path.join(folder, "filler")
    with open(path, "wb", buffering=0) as fh:
        for size in (1 << 20, 1 << 14, 1 << 10, 64):
            try:
                while True:
                    fh.write(b"\0" * size)
            except OSError as e:
                assert e.errno == errno.ENOSPC
    return path


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def env_for(minari_path, **more) -> dict:
    return {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"} | dict(
        MINARI_DATASETS_PATH=str(minari_path), OMP_NUM_THREADS="1", **more)


def target_only(tiny_data) -> list:
    return tiny_data["base_args"] + TINY + ["--variant", "target"]


# ---- one writer per run folder ----------------------------------------------------------------------------------------
def test_runs_started_in_the_same_second_keep_their_own_folders(tiny_data, tmp_path, monkeypatch):
    """Two runs whose names are the same (same flags but one, started in the same second): each gets its own folder,
    the second with -2, and each keeps its own flags and score."""
    clock = iter(1796670303.0 + 1e-6 * k for k in range(10**6))  # a second that lasts both runs (the clock moves)
    monkeypatch.setattr(time, "time", lambda: next(clock))
    first = train("v2a_iql", target_only(tiny_data) + ["--learning-rate", "0.001"], tmp_path)
    second = train("v2a_iql", target_only(tiny_data) + ["--learning-rate", "0.0001"], tmp_path)
    assert sorted(os.listdir(tmp_path / "runs")) == ["Hopper-v4__v2a_iql__target__1__1796670303",
                                                     "Hopper-v4__v2a_iql__target__1__1796670303-2"]
    assert {json.load(open(os.path.join(d, "args.json")))["learning_rate"] for d in (first, second)} == {0.001, 0.0001}
    assert all(os.path.exists(os.path.join(d, "results.json")) for d in (first, second))


def make_folder(name, start, queue):
    while time.time() < start:  # every process at the same instant
        pass
    queue.put(runs.new_run_folder(name))


def test_simultaneous_starts_make_distinct_folders(tmp_path, monkeypatch):
    """Four processes making the same run folder at the same instant: four folders, the first name and -2, -3, -4."""
    monkeypatch.chdir(tmp_path)
    ctx, start = multiprocessing.get_context("fork"), time.time() + 1.0
    queue = ctx.Queue()
    procs = [ctx.Process(target=make_folder, args=("runs/x__1__1796670303", start, queue)) for _ in range(4)]
    for p in procs:
        p.start()
    made = sorted(queue.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(60)
    assert made == ["runs/x__1__1796670303", *[f"runs/x__1__1796670303-{k}" for k in (2, 3, 4)]]


def test_a_second_writer_is_refused_and_kill_9_frees_the_folder(tiny_data, tmp_path):
    """--resume of a run that another process is writing: one line naming that process's pid, and nothing written into
    the folder. After the writer is killed with -9 the lock is free (an OS lock: no marker outlives the process)."""
    argv = [sys.executable, os.path.join(ROOT, "v2a_iql.py"), *tiny_data["base_args"], "--variant", "target",
            "--no-compile", "--total-steps", "5000", "--eval-freq", "5000", "--log-freq", "1000"]  # runs till killed
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    writer = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + SUBPROCESS_TIMEOUT
        while not glob.glob(str(tmp_path / "runs" / "*" / "args.json")) and time.time() < deadline:
            assert writer.poll() is None, "the first run ended before its folder was made"
            time.sleep(0.2)
        (run_dir,) = glob.glob(str(tmp_path / "runs" / "*"))
        args_json = open(os.path.join(run_dir, "args.json"), "rb").read()
        msg = refused("v2a_iql", ["--resume", run_dir], tmp_path)
        assert f"{run_dir} is in use by another process (pid {writer.pid})" in msg and f"kill {writer.pid}" in msg
        assert open(os.path.join(run_dir, "args.json"), "rb").read() == args_json
        assert writer.poll() is None  # it was running all along
    finally:
        writer.kill()
        writer.wait()
    runs.lock_run_folder(run_dir)  # free again: no error
    assert open(os.path.join(run_dir, runs.RUN_LOCK)).read().strip() == str(os.getpid())


# ---- a full disk ------------------------------------------------------------------------------------------------------
def test_a_full_disk_in_data_generation_is_one_line_and_leaves_nothing(small_disk):
    """data_gen.py on a full disk: what dead writers left (a staging folder that keeps the disk full, a write probe) is
    removed first; then a dataset that does not fit stops the run in one line, before h5py writes (it would print a
    traceback per object and could segfault), and no staging folder or probe is left."""
    disk = small_disk("2m")
    root, pid = disk / "datasets", dead_pid()
    root.mkdir()
    (root / f".v2a-write-probe-{pid}").write_text("")
    stale = disk / f"datasets-staging-{pid}"
    stale.mkdir()
    fill(stale)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "data_gen.py"), "--source", "torso-hard:random",
                           "--source-size", "20000", "--target-size", "1000", "--ref-min-episodes", "2",
                           "--ref-max-episodes", "1"], cwd=ROOT, env=env_for(root), capture_output=True, text=True,
                          timeout=SUBPROCESS_TIMEOUT)
    assert proc.returncode == 1 and f"removed {stale}" in proc.stdout
    assert re.fullmatch(f"data_gen.py: error: no space left on device under {root}: v2a/hopper-v4/source/"
                        r"torsohard-random-20k-v0 \(\d+ episodes\): [\d.]+ MB needed, [\d.]+ MB free; make room there, or set "
                        r"MINARI_DATASETS_PATH to a folder on a disk with room\n", proc.stderr), proc.stderr
    assert sorted(os.listdir(disk)) == ["datasets"] and sorted(os.listdir(root)) == [".v2a-data_gen.lock", "v2a"]
    assert os.listdir(root / "v2a" / "hopper-v4") == ["target"]  # the target dataset was whole, and fitted


def test_a_full_disk_in_the_trainers_data_generation_is_one_line(tiny_data, small_disk, tmp_path):
    """A training script whose data_gen.py child meets a full disk: the child's one line is the trainer's, and nothing
    of the generation is left."""
    disk = small_disk("2m")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "v2a_iql.py"), "--source", "torso-hard:random",
                           "--source-size", "20000", "--target-size", "1000", "--variant", "target"], cwd=tmp_path,
                          env=env_for(disk / "datasets"), capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)
    assert proc.returncode == 1
    assert proc.stderr.startswith(f"v2a_iql.py: error: data_gen.py: error: no space left on device under {disk}/datasets")
    assert proc.stderr.count("\n") == 1 and sorted(os.listdir(disk)) == ["datasets"]
    assert not glob.glob(str(disk / "datasets" / ".v2a-write-probe-*")) and not os.path.exists(tmp_path / "runs")


def test_a_full_disk_at_a_checkpoint_and_at_results_is_one_line(tiny_data, small_disk, monkeypatch):
    """The disk fills just before the last stage-5 checkpoint, then (room made, --resume) before results.json: each
    time one line that says so and names the file, no .tmp left behind, and --resume after making room finishes."""
    disk, save, write_results = small_disk("32m"), training.save, training.write_results
    full = lambda f: lambda *a: (fill(disk), f(*a))
    monkeypatch.setattr(training, "save", lambda obj, path: (full(save) if obj.get("step") == 100 else save)(obj, path))
    msg = refused("v2a_iql", target_only(tiny_data), disk)
    (run_dir,) = glob.glob(str(disk / "runs" / "*"))
    rel = os.path.relpath(run_dir, disk)
    assert f"cannot write {rel}/stage5.pt (no space left on device); the checkpoints written before are intact" in msg
    assert sorted(os.listdir(run_dir)) == [".v2a-run.lock", "args.json", os.path.basename(
        glob.glob(os.path.join(run_dir, "events.*"))[0]), "stage5.pt"]  # step 50's
    os.remove(disk / "filler")
    monkeypatch.setattr(training, "save", save)
    monkeypatch.setattr(training, "write_results", full(write_results))
    msg = refused("v2a_iql", ["--resume", run_dir], disk)
    assert f"cannot write {run_dir}/results.json (no space left on device); training is done" in msg
    assert not glob.glob(os.path.join(run_dir, "*.tmp")) and not os.path.exists(os.path.join(run_dir, "results.json"))
    os.remove(disk / "filler")
    monkeypatch.setattr(training, "write_results", write_results)
    train("v2a_iql", ["--resume", run_dir], disk)
    assert json.load(open(os.path.join(run_dir, "results.json")))["final_eval"]["step"] == 100


FILL_AFTER_ARGS_JSON = """
import os, runpy, sys
import v2a_utils.training as training
from test_no_loss import fill
whole = training.write_whole
def write_then_fill(path, data):
    whole(path, data)
    if path.endswith("args.json"):
        fill(os.getcwd())
training.write_whole = write_then_fill
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.parametrize("script", ["v2a_iql", "v2a_td3bc"])
def test_a_full_disk_under_the_event_files_is_one_line(tiny_data, small_disk, script):
    """The disk fills right after args.json, so that TensorBoard's event writer (a thread of its own) meets it before
    any checkpoint: one line that names the command continuing the run, no traceback from either thread."""
    disk = small_disk("32m")
    argv = [*tiny_data["base_args"], "--variant", "target", "--no-compile", "--total-steps", "1000", "--eval-freq", "1000",
            "--log-freq", "10", "--eval-episodes", "1", "--final-eval-episodes", "1"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", PYTHONPATH=f"{ROOT}:{ROOT}/tests")
    proc = subprocess.run([sys.executable, "-c", FILL_AFTER_ARGS_JSON, os.path.join(ROOT, f"{script}.py"), *argv],
                          cwd=disk, env=env, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)
    (run_dir,) = glob.glob(str(disk / "runs" / "*"))
    rel = os.path.relpath(run_dir, disk)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith(f"{script}.py: error: no space left on device while writing {rel} (its TensorBoard "
                                  f"event files); the checkpoints written before are intact: make room, then continue "
                                  f"the run with python {ROOT}/{script}.py --resume {rel}"), proc.stderr


def test_a_full_disk_at_the_start_leaves_no_run_folder(tiny_data, small_disk):
    """A disk full before the run writes anything: one line, and no half-made run folder that could not be resumed."""
    disk = small_disk("1m")
    (disk / "runs").mkdir()
    fill(disk)
    msg = refused("v2a_iql", target_only(tiny_data), disk)
    assert "cannot write the run folder runs/Hopper-v4__v2a_iql__target__1__" in msg
    assert "(no space left on device); make room" in msg and os.listdir(disk / "runs") == []


# ---- benchmark.py checks a sweep before it starts anything ------------------------------------------------------------
def sweep_argv(tmp_path, *more) -> list:
    return ["run", "--sweep", "t", "--runs-root", str(tmp_path / "runs"), "--results-root", str(tmp_path / "results"),
            *more]


def test_a_sweep_is_checked_before_it_starts(tmp_path, monkeypatch):
    """Bad variants, grid flags the script does not have, negative seeds, no workers: one line each, --dry-run too; a
    real run starts nothing (no dataset generated, no run folder). Values, also one that a later one overrides, are
    checked as the script parses each run's command line."""
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    bad = ["--variants", "foo", "target", "--grid", "bogus-flag=1,2", "--seeds", "-1", "1", "--workers", "0"]
    for dry in (["--dry-run"], []):
        with pytest.raises(SystemExit) as e:
            benchmark.main(sweep_argv(tmp_path, *bad, *dry, "--", "--env-id", "Hopper-v4"))
        assert str(e.value).split("\n") == [
            "benchmark.py: error: --workers 0: must be at least 1 (the runs at a time)",
            "benchmark.py: error: --seeds -1: a seed lies in [0, 2^31), as the scripts' --seed",
            "benchmark.py: error: --variants foo: v2a_iql.py has no such --variant; it takes v2a, dvdf, igdf, merged, "
            "target, bc",
            "benchmark.py: error: --grid bogus-flag=1,2: v2a_iql.py has no flag --bogus-flag"]
        assert not os.path.exists(tmp_path / "runs") and not os.path.exists(tmp_path / "minari")
    with pytest.raises(SystemExit) as e:
        benchmark.main(sweep_argv(tmp_path, "--variants", "target", "--grid", "total-steps=abc,100", "--dry-run", "--",
                                  "--eval-freq", "10", "--eval-freq", "20", "--total_step", "3"))
    assert str(e.value) == "benchmark.py: error: --total_step after `--`: v2a_iql.py has no such flag (perhaps --total-steps)"
    with pytest.raises(SystemExit) as e:
        benchmark.main(sweep_argv(tmp_path, "--variants", "target", "--grid", "total-steps=abc,100", "--dry-run", "--",
                                  "--eval-freq", "x", "--eval-freq", "20"))
    assert str(e.value).split("\n") == [
        "benchmark.py: error: v2a_iql.py: Error parsing --total-steps: invalid literal for int() with base 10: 'abc'",
        "benchmark.py: error: v2a_iql.py: Error parsing --eval-freq: invalid literal for int() with base 10: 'x'"]


def test_a_report_of_a_sweep_without_runs_writes_nothing(tmp_path):
    with pytest.raises(SystemExit) as e:
        benchmark.main(["report", "--sweep", "doesnotexist", "--runs-root", str(tmp_path / "runs"), "--results-root",
                        str(tmp_path / "results"), "--pages", str(tmp_path / "pages"), "--index", str(tmp_path / "i.md")])
    assert str(e.value).startswith("benchmark.py: error: sweep doesnotexist has no runs") and "\n" not in str(e.value)
    assert os.listdir(tmp_path) == []


# ---- the smaller items ----------------------------------------------------------------------------------------------
def test_every_value_of_a_flag_given_twice_is_checked(tiny_data, tmp_path):
    """A flag given again overrides the value before it (as argparse's last value counts), but each value must be one
    the flag takes: `--total-steps abc ... --total-steps 1000` no longer runs."""
    msg = refused("v2a_iql", ["--total-steps", "abc", *target_only(tiny_data)], tmp_path)
    assert "error: Error parsing --total-steps: invalid literal for int() with base 10: 'abc'; python v2a_iql.py --help" in msg
    assert not os.path.exists(tmp_path / "runs")
    assert flags.flag_error(v2a_iql.Args, ["--total-steps", "100", "--total_steps=1000"])[0].total_steps == 1000


@pytest.mark.parametrize("flag", ["eval_freq", "eval_episodes", "final_eval_episodes", "log_freq", "batch_size", "z_dim"])
def test_a_count_of_zero_names_its_flag_alone(flag):
    with pytest.raises(SystemExit) as e:
        validate_args(v2a_iql, v2a_iql.Args(**{flag: 0}))
    assert str(e.value).endswith(f"error: --{flag.replace('_', '-')} must be > 0, got 0")


def test_data_generation_for_a_sweep_prints_no_warnings(tmp_path, monkeypatch, capfd):
    """data_gen.py as benchmark.py starts it (a user's environment: no PYTHONWARNINGS): its progress, no gymnasium or
    Minari warnings (-v4 is supported on purpose; Minari asks every dataset for an author's email)."""
    monkeypatch.delenv("PYTHONWARNINGS", raising=False)
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))
    benchmark.prepare_datasets([dict(script=os.path.join(ROOT, "v2a_iql.py"), argv=[
        "--env-id", "Hopper-v4", "--source", "gravity-0.5:expert", "--source-size", "300", "--target-size", "200"])])
    out, err = capfd.readouterr()
    assert "collecting v2a/hopper-v4/source/gravity0p5-expert-300-v0" in out and err == ""


# ---- what a fresh machine sees -----------------------------------------------------------------------------------------
def test_help_lists_every_shift():
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "data_gen.py"), "--help"], capture_output=True, text=True,
                          env=dict(os.environ, COLUMNS="200"), timeout=SUBPROCESS_TIMEOUT)
    text = " ".join(proc.stdout.split())
    for robot, parts in data_gen.ROBOTS.items():
        assert f"{robot} {', '.join([*parts['joints'], *parts['parts']])}" in text
    assert all(d in text for d in data_gen.domain_names("Ant") if d.startswith(("gravity", "friction")))


def test_the_docs_episode_metadata_expression_works(tiny_data):
    """docs/data_gen.md's expression for an episode's metadata, run on a dataset (Minari 0.5.4 returns a generator)."""
    doc = open(os.path.join(ROOT, "docs", "data_gen.md")).read()
    (expr,) = re.findall(r"`([^`]*get_episode_metadata[^`]*) == \{", doc)
    ds = minari.load_dataset(data_gen.dataset_ids(tiny_data["env_id"], tiny_data["source"], tiny_data["source_size"],
                                                  tiny_data["target_size"])[0][0])
    assert eval(expr, {"ds": ds, "i": 1}) == {"domain": "torso-hard", "quality": "random"}


def test_a_small_sweeps_page_says_what_it_scored(tmp_path):
    """Runs with two periodic evaluations and a 2-episode final one: the page says 'last 2' (not --tail-evals' 5) and
    does not promise 50 episodes."""
    for seed in range(1, 6):
        for variant in ("v2a", "dvdf"):
            fake_export(tmp_path / "results" / "fx", variant, seed, 10.0 * seed, final=10.0 * seed)
            path = tmp_path / "results" / "fx" / f"v2a_iql__{variant}__s{seed}" / "results.json"
            res = json.load(open(path))
            res["final_eval"].update(episodes=2, returns=[0.0] * 2, normalized_scores=[10.0 * seed] * 2)
            json.dump(res, open(path, "w"))
    report.report(report_cfg(tmp_path, reps=200, poi_reps=200))
    md = open(tmp_path / "docs" / "results" / "fx.md").read()
    assert "mean of its last 2 periodic evaluations" in md and "last 5" not in md
    assert "at least 50" not in md and "(2 episodes at the end of stage 5" in md


def test_the_estimate_measures_this_machine(tiny_data, tmp_path, monkeypatch, capsys):
    """The printed estimate scales the docs' rates by a probe of this machine: a machine at half their speed gets
    twice the time. The probe leaves the run's random streams alone."""
    from v2a_utils import timing  # here: the other tests of this file run on code that predates it

    rng = torch.get_rng_state()
    assert timing.machine_probe(torch.device("cpu"), seconds=0.05) > 0 and torch.equal(torch.get_rng_state(), rng)
    args = types.SimpleNamespace(env_id="Hopper-v4", repr_steps=100_000, sql_steps=0, dynamics_score="contrastive",
                                 info_steps=0, total_steps=0, vae_steps=0)
    at = lambda speed: timing.estimate(args, "v2a_iql.py", (1,), {}, torch.device("cpu"), 16 * 56.4, speed)
    assert "stage 1 2.8 h" in at(1.0) and "stage 1 5.6 h" in at(0.5) and "0.50x that CPU's" in at(0.5)
    monkeypatch.setattr(timing, "machine_probe", lambda dev: timing.PROBE_RATE / 2)
    train("v2a_iql", target_only(tiny_data), tmp_path)
    assert "scaled by this machine's speed, 0.50x that CPU's by a quarter-second probe" in capsys.readouterr().out
