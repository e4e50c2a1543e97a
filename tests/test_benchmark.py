"""benchmark.py: the sweep runner (local pool and Ray) on a fake training script, one real tiny run of v2a_iql.py, and
the report (v2a_utils/report.py) on fake exported runs checked against statistics computed by hand."""
import ast
import csv
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from typing import Optional

import numpy as np
import pytest

import benchmark
from v2a_utils import report

FAKE = textwrap.dedent('''
    """A stand-in for a training script: --total-steps steps of 0.05 s, one evaluation per step, a checkpoint
    (progress.json) after each, --resume like the real scripts; --crash-seed N: runs of seed N are killed (SIGKILL)
    after step 2, once."""
    import argparse, json, os, signal, time
    p = argparse.ArgumentParser()
    p.add_argument("--variant"); p.add_argument("--seed", type=int); p.add_argument("--resume")
    p.add_argument("--total-steps", type=int, default=4); p.add_argument("--crash-seed", type=int, default=-1)
    p.add_argument("--env-id", default="Hopper-v4"); p.add_argument("--target-size", type=int, default=100000)
    a = p.parse_args()
    if a.resume:
        rd = a.resume
        evals = json.load(open(os.path.join(rd, "progress.json")))["evals"]
        print("resuming from step", evals[-1][0] if evals else 0, flush=True)
    else:
        rd, evals = f"runs/{a.env_id}__fake__{a.variant}__{a.seed}__{time.time_ns()}", []
        os.makedirs(rd)
    json.dump(dict(vars(a), script="fake_trainer.py"), open(os.path.join(rd, "args.json"), "w"))
    for step in range(len(evals) + 1, a.total_steps + 1):
        time.sleep(0.05)
        evals.append([step, 0.0, 10.0 * a.seed + step])
        with open(os.path.join(rd, "progress.tmp"), "w") as fh:  # atomic, as the real scripts' checkpoints: a kill
            json.dump({"evals": evals}, fh)                         # mid-write must leave the previous one intact
        os.replace(os.path.join(rd, "progress.tmp"), os.path.join(rd, "progress.json"))
        print("step", step, flush=True)
        if a.seed == a.crash_seed and step == 2 and not os.path.exists("crashed_once"):
            open("crashed_once", "w").close()
            os.kill(os.getpid(), signal.SIGKILL)
    json.dump({"variant": a.variant, "final_normalized_score": evals[-1][2], "evals": evals},
              open(os.path.join(rd, "results.json"), "w"))
''')


@pytest.fixture
def sweep(tmp_path):
    script = tmp_path / "fake_trainer.py"
    script.write_text(FAKE)

    def launch(*extra_runner, crash=-1):
        return benchmark.main(["run", "--sweep", "t", "--scripts", str(script), "--variants", "a", "b", "--seeds", "1", "2",
                               "--runs-root", str(tmp_path / "runs"), "--results-root", str(tmp_path / "results"),
                               "--progress-every", "1", "--no-data-gen", *extra_runner,
                               "--", "--total-steps", "3", "--crash-seed", str(crash)])
    return launch, tmp_path


def attempts(tmp_path) -> dict:
    return {os.path.basename(os.path.dirname(p)): [a["state"] for a in json.load(open(p))["attempts"]]
            for p in glob.glob(str(tmp_path / "runs" / "t" / "*" / "benchmark.json"))}


def check_finished(tmp_path):
    names = sorted(os.listdir(tmp_path / "runs" / "t"))
    assert names == ["fake_trainer__a__s1", "fake_trainer__a__s2", "fake_trainer__b__s1", "fake_trainer__b__s2"]
    for name in names:
        (tdir,) = glob.glob(str(tmp_path / "runs" / "t" / name / "runs" / "*"))  # one run directory: never restarted
        res = json.load(open(os.path.join(tdir, "results.json")))
        assert [e[0] for e in res["evals"]] == [1, 2, 3]
        exported = tmp_path / "results" / "t" / name
        assert json.load(open(exported / "results.json")) == res
        assert json.load(open(exported / "run.json"))["wall_s"] > 0
        assert not os.path.exists(tmp_path / "runs" / "t" / name / ".lock")


def check_killed_run_resumed(launch, tmp_path, capsys):
    assert launch(crash=2) == 1  # the seed-2 runs are killed midway; the sweep goes on
    out = capsys.readouterr().out
    assert out.count("FAILED fake_trainer__") == 4  # a line each when it ends, and with its log tail at the end
    assert "step 2" in out  # the tail of the log
    assert attempts(tmp_path) == {"fake_trainer__a__s1": ["new"], "fake_trainer__b__s1": ["new"],
                                  "fake_trainer__a__s2": ["new"], "fake_trainer__b__s2": ["new"]}
    assert launch(crash=2) == 0
    assert "2 to resume, 0 to start" in capsys.readouterr().out
    for v in "ab":
        log = open(tmp_path / "runs" / "t" / f"fake_trainer__{v}__s2" / "train.log").read()
        assert "resume: " in log and "--resume runs/" in log and "resuming from step 2" in log
    check_finished(tmp_path)
    assert launch(crash=2) == 0  # all done: nothing runs
    assert "4 done, 0 running elsewhere, 0 to resume, 0 to start" in capsys.readouterr().out
    assert attempts(tmp_path)["fake_trainer__a__s2"] == ["new", "resume"]
    assert attempts(tmp_path)["fake_trainer__a__s1"] == ["new"]


def test_local_pool_finishes_and_skips(sweep, capsys):
    launch, tmp_path = sweep
    assert launch("--workers", "2") == 0
    out = capsys.readouterr().out
    assert "0 done, 0 running elsewhere, 0 to resume, 4 to start" in out and "4/4 finished (0 failed)" in out
    check_finished(tmp_path)
    assert launch("--workers", "2") == 0
    assert "4 done" in capsys.readouterr().out
    assert all(a == ["new"] for a in attempts(tmp_path).values())


def test_a_fresh_machine_continues_from_the_committed_exports(sweep, capsys):
    launch, tmp_path = sweep
    assert launch("--workers", "2") == 0
    shutil.rmtree(tmp_path / "runs")  # a fresh clone: the exports under results/ are all that is left of the runs
    shutil.rmtree(tmp_path / "results" / "t" / "fake_trainer__b__s2")
    capsys.readouterr()
    assert launch("--workers", "2") == 0
    assert "3 done, 0 running elsewhere, 0 to resume, 1 to start" in capsys.readouterr().out
    assert sorted(attempts(tmp_path)) == ["fake_trainer__b__s2"]
    # an export made with other flags is not this run: it is trained again (and its export replaced)
    record = tmp_path / "results" / "t" / "fake_trainer__a__s1" / "run.json"
    rec = json.load(open(record))
    rec["spec"]["argv"][-1] = "7"
    record.write_text(json.dumps(rec))
    assert launch("--workers", "2") == 0
    out = capsys.readouterr().out
    assert "fake_trainer__a__s1: the export under" in out and "3 done, 0 running elsewhere, 0 to resume, 1 to start" in out
    assert json.load(open(record))["spec"]["argv"][-1] == "-1"


def test_local_pool_resumes_a_killed_run(sweep, capsys):
    launch, tmp_path = sweep
    check_killed_run_resumed(lambda crash: launch("--workers", "2", crash=crash), tmp_path, capsys)


def test_a_killed_runner_leaves_its_attempt_on_record(sweep):
    """The runner itself killed outright (as a machine's session ends): the relaunch resumes the run and the record
    keeps the killed attempt, closed at the log's last write, so wall time and core-hours count it."""
    _, tmp_path = sweep
    argv = ["run", "--sweep", "t", "--scripts", str(tmp_path / "fake_trainer.py"), "--variants", "a", "--seeds", "1",
            "--runs-root", str(tmp_path / "runs"), "--results-root", str(tmp_path / "results"), "--no-data-gen",
            "--workers", "1", "--", "--total-steps", "60"]
    run_dir = tmp_path / "runs" / "t" / "fake_trainer__a__s1"
    runner = subprocess.Popen([sys.executable, "-c", f"import sys, benchmark; sys.exit(benchmark.main({argv!r}))"],
                              cwd=os.path.dirname(benchmark.__file__))
    deadline = time.time() + 60
    while not (run_dir / "train.log").exists() or "step 5" not in (run_dir / "train.log").read_text():
        assert time.time() < deadline and runner.poll() is None, "the run did not start"
        time.sleep(0.05)
    trainer_pid = json.load(open(run_dir / ".lock"))[1]
    for pid in (runner.pid, trainer_pid):
        os.kill(pid, signal.SIGKILL)
    runner.wait()
    killed_at = time.time()
    while benchmark.pid_alive(trainer_pid) and time.time() < killed_at + 10:  # until init has reaped the orphan
        time.sleep(0.05)
    assert benchmark.main(argv) == 0
    first, second = json.load(open(run_dir / "benchmark.json"))["attempts"]
    assert (first["state"], first["rc"], first.get("killed"), second["state"], second["rc"]) == ("new", None, True,
                                                                                                 "resume", 0)
    assert first["start"] < first["end"] <= killed_at + 1  # closed at the killed process's last log line
    exported = json.load(open(tmp_path / "results" / "t" / "fake_trainer__a__s1" / "run.json"))
    assert exported["wall_s"] == pytest.approx(sum(a["end"] - a["start"] for a in (first, second)))


def test_launch_order_resumes_first_then_seed_major(sweep, capsys):
    """A sweep stopped part-way should hold the same seeds of every variant: runs start seed by seed (every variant of
    seed 1, then of seed 2), after the runs that a stopped sweep left to resume."""
    _, tmp_path = sweep  # the fixture writes the fake trainer; this test launches with its own variants and seeds
    script = str(tmp_path / "fake_trainer.py")
    common = ["--scripts", script, "--runs-root", str(tmp_path / "runs"), "--results-root", str(tmp_path / "results"),
              "--no-data-gen", "--workers", "1"]
    # a first sweep of variant a alone: its seed-2 run is killed midway and left to resume
    assert benchmark.main(["run", "--sweep", "t", "--variants", "a", "--seeds", "1", "2", *common,
                           "--", "--total-steps", "3", "--crash-seed", "2"]) == 1
    assert benchmark.main(["run", "--sweep", "t", "--variants", "a", "b", "--seeds", "1", "2", "3", *common,
                           "--dry-run", "--", "--total-steps", "3"]) == 0
    listed = [line.split()[1].rstrip(":") for line in capsys.readouterr().out.splitlines() if line.startswith("  ")]
    assert listed == [f"fake_trainer__{v}__s{s}" for s in (1, 2, 3) for v in "ab"]
    assert benchmark.main(["run", "--sweep", "t", "--variants", "a", "b", "--seeds", "1", "2", "3", *common,
                           "--", "--total-steps", "3"]) == 0
    starts = {}
    for p in glob.glob(str(tmp_path / "runs" / "t" / "*" / "benchmark.json")):
        last = json.load(open(p))["attempts"][-1]
        starts[os.path.basename(os.path.dirname(p))] = last["start"]
    second = [n for n, _ in sorted(starts.items(), key=lambda kv: kv[1]) if n != "fake_trainer__a__s1"]
    assert second == ["fake_trainer__a__s2", "fake_trainer__b__s1", "fake_trainer__b__s2", "fake_trainer__a__s3",
                      "fake_trainer__b__s3"]


def test_ray_resumes_a_killed_run(sweep, capsys):
    ray = pytest.importorskip("ray")
    launch, tmp_path = sweep
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        check_killed_run_resumed(lambda crash: launch("--ray-address", "auto", crash=crash), tmp_path, capsys)
    finally:
        ray.shutdown()


def test_progress_eta_counts_down(monkeypatch, capsys):
    """4 runs of 600 s each (from an earlier run), 2 at a time: 20 min at the start; 10 min later (both runs half
    done), 15 min; when one ends and the next starts, (600 queued + 60 for the run at its mean duration (a tenth of
    it) + 600 for the new one) / 2 = 630 s, 10 min."""
    now = [1000.0]
    monkeypatch.setattr(benchmark.time, "time", lambda: now[0])
    progress = benchmark.Progress(total=4, workers=2, past=[600.0], every=0)
    progress.line(2)
    now[0] += 300
    progress.line(2)
    now[0] += 300
    progress.ended(dict(name="a", rc=0, state="new", seconds=600.0))
    progress.line(2)
    etas = [line.rsplit("ETA ", 1)[1] for line in capsys.readouterr().out.splitlines() if "ETA" in line]
    assert etas == ["20 min", "15 min", "10 min"]


def test_a_run_another_runner_took_is_skipped_not_finished(capsys):
    """Two runners on one sweep: a run planned by this one but started by the other meanwhile (state "running" when its
    turn comes) is reported as skipped and leaves the total, not counted as finished."""
    progress = benchmark.Progress(total=3, workers=1, past=[], every=0)
    progress.ended(dict(name="v2a_s2", rc=0, state="running", seconds=0.0))
    progress.ended(dict(name="bc_s3", rc=0, state="new", seconds=60.0))
    progress.line(1, force=True)
    out = capsys.readouterr().out
    assert "skipped v2a_s2: another runner runs it" in out and "ok v2a_s2" not in out and "ok bc_s3 (new" in out
    assert out.splitlines()[-1].startswith("[benchmark] 1/2 finished (0 failed), 1 running, 0 left")


def test_code_version_marks_changed_code_not_exports(tmp_path):
    """An attempt's recorded commit gets "+modified" for a changed script, not for the exports and pages that a
    running sweep rewrites in the same tree."""
    git = lambda *a: subprocess.run(["git", "-C", str(tmp_path), *a], check=True, capture_output=True)
    git("init", "-q")
    for rel in ("train.py", "results/s/run.json", "docs/results/s.md", "README.md"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("v1\n")
    git("add", "-A")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "v1")
    clean = benchmark.code_version(str(tmp_path))
    assert clean and len(clean) == 40
    for rel in ("results/s/run.json", "docs/results/s.md", "README.md"):
        (tmp_path / rel).write_text("v2\n")
    assert benchmark.code_version(str(tmp_path)) == clean
    (tmp_path / "train.py").write_text("v2\n")
    assert benchmark.code_version(str(tmp_path)) == clean + "+modified"


def test_bad_grid_and_pass_through_flags(sweep):
    launch, tmp_path = sweep
    for argv in (["--grid", "seed=1"], ["--grid", "--x=1,2"]):
        with pytest.raises(SystemExit):
            launch(*argv)
    specs = benchmark.make_specs(benchmark.Run(scripts=[str(tmp_path / "fake_trainer.py")], variants=["a"], seeds=[1],
                                               grid=["target-size=5000,100000", "xi=0.5"]), ["--total-steps", "3"])
    assert [s["name"] for s in specs] == ["fake_trainer__a__target-size=5000,xi=0.5__s1",
                                          "fake_trainer__a__target-size=100000,xi=0.5__s1"]
    assert specs[0]["argv"] == ["--variant", "a", "--seed", "1", "--target-size", "5000", "--xi", "0.5", "--total-steps", "3"]
    specs = benchmark.make_specs(benchmark.Run(scripts=[str(tmp_path / "fake_trainer.py")], variants=["a"], seeds=[1],
                                               grid=["normalize-states=false,True"]), [])
    # a boolean axis switches tyro's flag pair
    assert [s["argv"][4:] for s in specs] == [["--no-normalize-states"], ["--normalize-states"]]
    with pytest.raises(SystemExit):
        benchmark.make_specs(benchmark.Run(scripts=[str(tmp_path / "fake_trainer.py")]), ["--seed", "3"])


def test_real_tiny_run(tiny_data, tmp_path, capsys):
    """One v2a_iql.py --variant target run through the runner: it finishes, is exported, and is not run again."""
    argv = ["run", "--sweep", "real", "--variants", "target", "--seeds", "1", "--workers", "1",
            "--runs-root", str(tmp_path / "runs"), "--results-root", str(tmp_path / "results"), "--",
            *tiny_data["base_args"], "--no-compile", "--repr-steps", "20", "--sql-steps", "20", "--info-steps", "20",
            "--total-steps", "100", "--eval-freq", "50", "--eval-episodes", "1", "--log-freq", "50"]
    assert benchmark.main(argv) == 0, capsys.readouterr().out
    exported = tmp_path / "results" / "real" / "v2a_iql__target__s1"
    res = json.load(open(exported / "results.json"))
    assert [e[0] for e in res["evals"]] == [50, 100]
    rows = list(csv.DictReader(open(exported / "curves.csv")))
    assert [int(r["step"]) for r in rows if r["tag"] == "eval/normalized_score"] == [50, 100]
    assert json.load(open(exported / "args.json"))["variant"] == "target"
    code = json.load(open(exported / "run.json"))["attempts"][0]["code"]  # the commit the run was made with
    head = subprocess.run(["git", "-C", benchmark.ROOT, "rev-parse", "HEAD"], capture_output=True, text=True)
    assert code is None if head.returncode else code.split("+")[0] == head.stdout.strip()
    assert benchmark.main(argv) == 0
    assert "1 done" in capsys.readouterr().out


def test_training_scripts_do_not_import_the_benchmark_dependencies():
    for script in ("v2a_iql.py", "v2a_td3bc.py", "data_gen.py"):
        tree = ast.parse(open(os.path.join(benchmark.ROOT, script)).read())
        names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {f"{n.module}.{a.name}" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module
                  for a in n.names}  # v2a_utils.report: `from v2a_utils import report`
        names |= {name.split(".")[0] for name in names}
        assert not names & {"ray", "rliable", "matplotlib", "benchmark", "v2a_utils.report"}, script


# ---- report ------------------------------------------------------------------------------------------------------------
V2A = [10, 20, 30, 40, 50, 60, 70, 80]
DVDF = [5, 15, 25, 35, 45, 55, 65, 75]


def fake_export(folder, variant: str, seed: int, score, total: int = 100, earlier: Optional[list] = None,
                final: Optional[float] = None, norm: Optional[dict] = None, data_level: Optional[float] = None,
                launch: str = "python benchmark.py run --sweep fx", start: float = 1.8e9):
    """An exported run whose periodic evaluations score `earlier` (default: `score` at step 50), then `score` at step 100
    (None: unfinished, one evaluation at step 50); `final`: a final 50-episode evaluation scoring that (runs after it
    existed), `norm`: the backbone's normalisation flags, `data_level`: the target data's own normalized score."""
    d = folder / f"v2a_iql__{variant}__s{seed}"
    d.mkdir(parents=True)
    args = dict(script="v2a_iql.py", env_id="Hopper-v4", target_size=100000, source=None, source_size=1000000,
                variant=variant, seed=seed, total_steps=total, repr_steps=10, sql_steps=10, info_steps=10, eval_freq=50,
                eval_episodes=1, **(norm or {}))
    json.dump(args, open(d / "args.json", "w"))
    machine = dict(host="h", cpu="cpu", cores=2, cuda_visible=None)
    json.dump(dict(spec=dict(grid={}, launch=launch), attempts=[
        dict(start=start, end=start + 3600, rc=0, state="new", machine=machine, code="abc1234" + "0" * 33)],
        wall_s=3600.0), open(d / "run.json", "w"))
    values = (earlier or [score or 0]) + ([score] if score is not None else [])
    steps = [50 * (i + 1) for i in range(len(values))]
    if score is not None:
        res = dict(variant=variant, final_normalized_score=score, evals=[[s, 0, v] for s, v in zip(steps, values)])
        if final is not None:
            res.update(final_normalized_score=final, last_eval_normalized_score=score, final_eval=dict(
                step=steps[-1], episodes=50, seed=10**6, returns=[0.0] * 50, normalized_scores=[final] * 50, **{
                    "return": 0.0, "normalized_score": final}))
        if data_level is not None:
            res["target_data_normalized_score"] = data_level
        json.dump(res, open(d / "results.json", "w"))
    with open(d / "curves.csv", "w") as fh:
        fh.write("tag,step,value\n" + "".join(f"eval/normalized_score,{s},{v}\n" for s, v in zip(steps, values)))
        if variant not in ("merged", "bc"):
            fh.write("".join(f"filter/kept_frac/{n},{s},0.5\n" for n in ("gravity-0.5", "expert") for s in steps))
            fh.write("".join(f"charts/{tag},{s},0.5\n" for tag in ("q_source_rows", "awr_weight_source_share") for s in steps))
        if variant == "v2a":
            fh.write("".join(f"repr/{tag},{i},{v}\n" for i in range(1, 21) for tag, v in (
                ("rec_loss", 0.3 if i == 9 else 0.1), ("stage1_domain_probe_acc", 0.9))))
    if variant in ("v2a", "dvdf"):
        (d / "adv_hist.csv").write_text("group,right_edge,count\ngravity-0.5-expert,0.1,3\ngravity-0.5-expert,0.2,5\n")
    if variant == "v2a":
        (d / "z_pca.csv").write_text("pc1,pc2,domain,quality,var1=0.5,var2=0.2\n"
                                     "0,1,gravity-0.5,expert\n1,0,torso-hard,random\n")


def report_cfg(tmp_path, sweep="fx", **kw) -> benchmark.Report:
    return benchmark.Report(sweep=sweep, runs_root=str(tmp_path / "runs"), results_root=str(tmp_path / "results"),
                            pages=str(tmp_path / "docs" / "results"), index=str(tmp_path / "docs" / "results.md"),
                            **{"reps": 1000, "poi_reps": 1000, **kw})


def claim(md: str, a: str, b: str) -> str:
    """The line of the claim a > b in a page's first table."""
    return next(x for x in md.split("\n") if x.startswith(f"- `{a}` > `{b}`: "))


def test_report_statistics_and_verdict_rule(tmp_path):
    """evidence2: statistics by hand; the verdict rule of docs/benchmark.md: a claim holds when the CI of P(X > Y), at
    1 - 0.05 / k for the k comparisons of the table, lies above 0.5; fewer than 5 seeds: mean and range, no IQM or CI."""
    res = tmp_path / "results" / "fx"
    for i, (a, b) in enumerate(zip(V2A, DVDF)):
        fake_export(res, "v2a", i + 1, a)
        fake_export(res, "dvdf", i + 1, b)
    fake_export(res, "igdf", 1, None)  # unfinished: counted as such, not scored
    cfg = report_cfg(tmp_path)
    (task, st), = report.report(cfg).items()
    assert task == ("v2a_iql", "Hopper-v4", 100000, None, 1000000, ())
    v, d = st["methods"]["v2a"], st["methods"]["dvdf"]
    assert "igdf" not in st["methods"] and v["n"] == d["n"] == 8
    assert v["mean"] == pytest.approx(45.0) and v["se"] == pytest.approx(np.sqrt(600 / 8))  # sample variance 600
    assert v["iqm"] == pytest.approx((30 + 40 + 50 + 60) / 4) and d["iqm"] == pytest.approx((25 + 35 + 45 + 55) / 4)
    assert 10 <= v["iqm_ci"][0] < 45 < v["iqm_ci"][1] <= 80
    assert v["agg"][2] == pytest.approx(100 - 45.0)  # the optimality gap below the expert's 100
    wins = sum((x > y) + 0.5 * (x == y) for x in V2A for y in DVDF) / 64  # 36 / 64
    assert st["poi"][("v2a", "dvdf")]["p"] == pytest.approx(wins) == pytest.approx(0.5625)
    assert (st["k"], st["level"]) == (1, pytest.approx(0.95))  # one comparison: no correction
    np.random.seed(12345)  # the bootstrap is seeded by --seed alone, whatever NumPy's global state
    assert report.report(cfg)[task]["poi"][("v2a", "dvdf")]["ci"] == st["poi"][("v2a", "dvdf")]["ci"]
    md = open(tmp_path / "docs" / "results" / "fx.md").read()
    assert "| v2a | 8 | 0 | 45.0 [" in md and "| 45.0 ± 8.7 (range 10.0–80.0) |" in md and "| igdf | 0 | 1 | – |" in md
    assert claim(md, "v2a", "dvdf").startswith("- `v2a` > `dvdf`: not resolved (the CI includes 0.5): P(v2a > dvdf) = 0.56")
    assert "Score: the last periodic evaluation (1 episodes): these runs predate the final evaluation." in md
    for seed, score in enumerate((90.0, 95.0, 100.0, 92.0, 97.0)):  # target data alone, far above every V2A seed
        fake_export(res, "target", seed + 1, score)
    for seed, score in enumerate((20.0, 30.0, 25.0)):  # three seeds: mean and range only
        fake_export(res, "merged", seed + 1, score)
    st = report.report(cfg)[task]
    md = open(tmp_path / "docs" / "results" / "fx.md").read()
    assert st["k"] == 2 and st["level"] == pytest.approx(1 - 0.05 / 2)  # v2a vs dvdf and target; merged has 3 seeds
    assert "CIs of P at 97.5 % (Bonferroni over the 2 comparisons of this table)" in md
    assert claim(md, "v2a", "target").startswith("- `v2a` > `target`: **reversed** (`target` > `v2a` holds)")
    assert "| merged | 3 | 0 | – (n < 5) | 25.0 (range 20.0–30.0) | – |" in md  # no IQM, no CI, no P
    assert claim(md, "v2a", "dvdf") and "`igdf` > `merged`: not testable (finished seeds igdf: 0, merged: 3" in md
    assert ("merged", "target") not in st["poi"] and ("v2a", "merged") not in st["poi"]
    for line in md.split("\n"):  # every verdict follows the CI: holds exactly when its lower bound exceeds 0.5
        if line.startswith("- `") and " = " in line and "P(" in line:
            lo, hi = map(float, line.split("[", 1)[1].split("]")[0].split(", "))
            assert ("**holds**" in line) == (lo > 0.5) and ("**reversed**" in line) == (hi < 0.5), line
    (res / "reading.md").write_text("V2A ends above DVDF in 5 of 8 seeds.\n")  # the hand-written reading is kept
    report.report(cfg)
    md = open(tmp_path / "docs" / "results" / "fx.md").read()
    assert "V2A ends above DVDF in 5 of 8 seeds." in md and "TODO (lead)" not in md
    pngs = sorted(os.listdir(tmp_path / "docs" / "results" / "fx"))
    assert pngs == [f"{n}_Hopper-v4_iql_t100000.png" for n in ("adv", "curves", "intervals", "kept", "poi", "scores",
                                                                  "stage1", "values", "z", "zseeds")]
    # every figure is followed by its caption
    assert all(f"(fx/{p})\n\n*" in md for p in pngs)
    assert "the largest spike of a seed is 3.0× the median of its neighbours (8 of 8 seeds" in md  # read off the curves
    assert "z as above for each of the 8 seeds of v2a" in md


def test_report_evaluation_noise_table(tmp_path):
    """The second table scores each run by the mean of its last tail_evals evaluations; its sd column is the spread of
    those evaluations within a run, averaged over seeds. Checked by hand on five seeds of two methods."""
    res = tmp_path / "results" / "fx"
    v2a = [([10, 30], 20), ([40, 40], 40), ([0, 90], 60), ([50, 50], 50), ([20, 20], 20)]
    for seed, (earlier, last) in enumerate(v2a, 1):
        fake_export(res, "v2a", seed, last, total=150, earlier=earlier)
        fake_export(res, "dvdf", seed, 10.0 * seed, total=150, earlier=[10.0 * seed, 10.0 * seed])
    cfg = report_cfg(tmp_path, reps=500, poi_reps=200, tail_evals=2)
    (_, st), = report.report(cfg).items()
    assert st["methods"]["v2a"]["mean"] == pytest.approx(38.0)  # the score stays the last evaluation
    v, d = st["tail"]["methods"]["v2a"], st["tail"]["methods"]["dvdf"]
    assert v["scores"] == pytest.approx([25.0, 40.0, 75.0, 50.0, 20.0]) and v["mean"] == pytest.approx(42.0)
    assert d["scores"] == pytest.approx([10.0, 20.0, 30.0, 40.0, 50.0]) and d["iqm"] == pytest.approx(30.0)
    wins = sum((x > y) + 0.5 * (x == y) for x in v["scores"] for y in d["scores"]) / 25
    assert st["tail"]["poi"][("v2a", "dvdf")]["p"] == pytest.approx(wins)
    sd_v2a = np.mean([np.std([30, 20], ddof=1), 0.0, np.std([90, 60], ddof=1), 0.0, 0.0])
    md = open(tmp_path / "docs" / "results" / "fx.md").read()
    assert "mean of its last 2 periodic evaluations" in md
    noise = md.split("**Evaluation noise.**")[1]
    v2a_row = next(x for x in noise.split("\n") if x.startswith("| v2a | "))  # IQM of 20, 25, 40, 50, 75: 38.3
    assert v2a_row.startswith("| v2a | 38.3 [") and v2a_row.endswith(f"| – | {sd_v2a:.1f} |")


def test_report_one_page_per_sweep_and_an_index(tmp_path, capsys):
    """journey: each sweep gets its own page and figure folder; a report never touches another sweep's; the index
    lists the pages that exist; unfinished runs are counted, not scored; the report says what it does; regenerating
    gives the same bytes."""
    for sweep, shift in (("fx", 0), ("fy", 5)):
        for seed in range(1, 6):
            fake_export(tmp_path / "results" / sweep, "v2a", seed, 10.0 * seed + shift)
            fake_export(tmp_path / "results" / sweep, "dvdf", seed, 10.0 * seed)
    fake_export(tmp_path / "results" / "fx", "dvdf", 6, None)  # an export of a killed run: no results.json
    pages = tmp_path / "docs" / "results"
    report.report(report_cfg(tmp_path, "fx"))
    out = capsys.readouterr().out
    for line in ("[report] reading runs from", "[report] 11 runs: 10 finished, 1 unfinished (counted, not scored)",
                 "bootstrap (1000 replications", "[report] figure ", f"[report] wrote {pages / 'fx.md'}",
                 "[report] wrote " + str(tmp_path / "docs" / "results.md")):
        assert line in out, line
    snapshot = {p: p.read_bytes() for p in [pages / "fx.md", *sorted((pages / "fx").iterdir())]}
    assert "| dvdf | 5 | 1 |" in snapshot[pages / "fx.md"].decode()
    report.report(report_cfg(tmp_path, "fy"))
    assert {p: p.read_bytes() for p in [pages / "fx.md", *sorted((pages / "fx").iterdir())]} == snapshot
    assert (pages / "fy.md").exists() and sorted(os.listdir(pages / "fy")) == sorted(os.listdir(pages / "fx"))
    index = (tmp_path / "docs" / "results.md").read_text()
    assert "- **[fx](results/fx.md)**\n  - Hopper-v4, release IQL: raw states and rewards; target 100,000\n" in index
    assert "- **[fy](results/fy.md)**\n" in index
    (pages / "fx" / "old_figure.png").write_bytes(b"")  # a figure the report no longer makes: removed
    report.report(report_cfg(tmp_path, "fx"))
    assert {p: p.read_bytes() for p in [pages / "fx.md", *sorted((pages / "fx").iterdir())]} == snapshot


def test_report_backbone_final_evaluation_and_anchors(tmp_path):
    """backbone: runs from before the final evaluation and the normalisation flags get their own table, labelled
    'release IQL: raw states and rewards' and scored by their last periodic evaluation; newer runs are scored by the
    final evaluation, with the target data's level and BC's as anchors; a page says at its top when no learner reaches
    BC's level; the Setup shows the flags, names no machine path, and labels process-hours and late code records."""
    res = tmp_path / "results" / "fx"
    old = "python benchmark.py run --sweep fx --runs-root /any/machine/runs --results-root /any/machine/res -- --total-steps 9"
    for seed in range(1, 6):
        fake_export(res, "v2a", seed, 20.0 + seed, launch=old, start=1.7e9)  # before the runner recorded code at start
    norm = dict(normalize_states=True, reward_scale="episode-range", awr_clip=100.0, actor_schedule="constant")
    for seed in range(11, 16):  # periodic 90 (the last), final evaluation 30 + seed: the score is the final one
        fake_export(res / "new", "v2a", seed, 90.0, final=30.0 + seed, norm=norm, data_level=70.0)
        fake_export(res / "new", "bc", seed, 90.0, final=60.0 + seed, norm=norm, data_level=70.0)
    for d in (res / "new").iterdir():
        d.rename(res / d.name)
    cfg = report_cfg(tmp_path)
    stats = report.report(cfg)
    md = open(tmp_path / "docs" / "results" / "fx.md").read()
    old_task, new_task = sorted(stats, key=lambda t: len(t[5]))
    assert stats[new_task]["methods"]["v2a"]["scores"] == pytest.approx([41, 42, 43, 44, 45])
    assert stats[old_task]["methods"]["v2a"]["scores"] == pytest.approx([21, 22, 23, 24, 25])
    assert "## Hopper-v4, release IQL: raw states and rewards; target 100,000" in md
    assert ("## Hopper-v4, IQL: normalized states, rewards × 1000 / episode-return range, constant actor lr; target 100,000"
            in md)
    assert "Score: the last periodic evaluation (1 episodes): these runs predate the final evaluation." in md
    assert "Score: the final evaluation of each run (50 episodes at the end of stage 5" in md
    assert "Anchors: target data 70.0 · BC 73.0 (IQM of 5 seeds) · expert 100." in md
    assert "Anchors: target data: not on record for these runs" in md
    headline = "no learner's level reaches behaviour cloning's** (BC 73.0; the best, `v2a`, 43.0; levels are IQMs"
    assert md.index(headline) < md.index("## ")
    assert claim(md, "v2a", "bc").startswith("- `v2a` > `bc`: **reversed**")
    assert '"normalize_states": true, "reward_scale": "episode-range", "awr_clip": 100.0, "actor_schedule": "constant"' in md
    assert "/any/machine" not in md and "--runs-root" not in md
    assert "Process-hours (one thread each, 2-core h shared by up to" in md
    assert "`abc1234`: IQL v2a s1 †, IQL v2a s2 †" in md and "† Recorded when the attempt ended" in md
    assert "IQL v2a s11," in md and "IQL v2a s11 †" not in md
    assert len([f for f in os.listdir(tmp_path / "docs" / "results" / "fx") if f.startswith("scores_")]) == 2


def test_central_range_of_pooled_histograms():
    """The advantage figure's x range: the 1st to 99th percentile of all groups (5 % padding), not the far outliers."""
    body = [(float(e), 10.0) for e in range(-5, 6)]  # 110 rows between -5 and 5
    lo, hi = report.central_range([body, [(-1000.0, 1.0)], [(500.0, 1.0)]])
    assert (lo, hi) == pytest.approx((-5 - 0.5, 5 + 0.5))
    assert report.central_range([[(2.0, 3.0)]]) == (1.0, 3.0)  # one bucket: a unit pad


def test_report_filter_accuracy_section_and_filter_only_runs(tmp_path):
    """filter-truth: --filter-only runs (results.json with filter_accuracy, no evaluation) are done for the runner, stay
    out of the score tables, and their accuracy is a section of the page: mean over seeds with its bootstrap CI."""
    res = tmp_path / "results" / "fx"
    for seed, spearman in enumerate((0.2, 0.4, 0.6)):
        fake_export(res, "dvdf", seed + 1, None)
        d = res / f"v2a_iql__dvdf__s{seed + 1}"
        json.dump(dict(variant="dvdf", filter_only=True, filter_accuracy={"dyn_spearman": spearman,
                                                                           "value_misassign_cross": None}),
                  open(d / "results.json", "w"))
    fake_export(res, "target", 1, 50.0)
    report.report(report_cfg(tmp_path))
    md = open(tmp_path / "docs" / "results" / "fx.md").read()
    assert "## Filter accuracy" in md and "| dvdf | 0 |" not in md and "| target | 1 | 0 |" in md
    row = next(x for x in md.split("\n") if x.startswith("| dvdf | [1, 2, 3] |"))
    assert row.split(" | ")[2].startswith("0.400 [0.2") and "| `dyn_spearman` | 0.400 [" in md
    spec = dict(name="dvdf_s1", run_dir=str(tmp_path / "none"), argv=None, export_dir=str(res / "v2a_iql__dvdf__s1"))
    assert benchmark.exported_done(spec) and benchmark.reached_total(spec, {"filter_only": True})


def test_values_axis_clips_a_diverging_curve():
    """hopper-crossed: one diverging run's mean (thousands) flattened every other curve of the values figure; the axis
    now spans the central values and the title names the curve that leaves it."""
    plt = report.pyplot()
    fig, ax = plt.subplots()
    ax.set_title("min Q")
    steady, wild = np.full(50, 250.0), np.r_[np.full(45, 250.0), np.linspace(800.0, 6600.0, 5)]  # the last 5 evaluations
    report.clip_to_central(ax, [("v2a", steady), ("igdf", steady + 5), ("dvdf", wild)])
    assert ax.get_ylim()[1] < 6600 and "axis clipped: dvdf reaches 6,600" in ax.get_title()
    report.clip_to_central(ax2 := fig.add_subplot(), [("v2a", steady), ("igdf", steady + 5)])
    assert "clipped" not in ax2.get_title()
    plt.close(fig)


def test_report_lists_the_datasets_fingerprints(tmp_path):
    """filter-truth: every page lists the datasets its runs trained on by fingerprint, with the machine that made them."""
    res = tmp_path / "results" / "fx"
    for seed, fp in ((1, "aaaa0000bbbb1111"), (2, None)):
        fake_export(res, "target", seed, 50.0)
        args_path = res / f"v2a_iql__target__s{seed}" / "args.json"
        args = json.load(open(args_path))
        args["datasets"] = {"v2a/hopper-v4/target/medium-5k-v0": dict(fingerprint=fp, machine=fp and {"cpu": "AMD EPYC"})}
        json.dump(args, open(args_path, "w"))
    report.report(report_cfg(tmp_path))
    md = open(tmp_path / "docs" / "results" / "fx.md").read()
    assert "| `v2a/hopper-v4/target/medium-5k-v0` | `aaaa0000bbbb1111` | AMD EPYC | 1 |" in md
    assert "| `v2a/hopper-v4/target/medium-5k-v0` | `not recorded` | machine not recorded | 1 |" in md


def test_the_index_names_a_sweep_of_filter_only_runs(tmp_path):
    """A page with filter accuracy and no score table is listed as such, not as a sweep without runs."""
    pages = tmp_path / "pages"
    pages.mkdir()
    (pages / "ft.md").write_text("# Results: sweep `ft`\n\n## Filter accuracy\n\n## Reading\n")
    (pages / "empty.md").write_text("# Results: sweep `empty`\n\n## Setup\n")
    report.write_index(str(pages), str(tmp_path / "index.md"))
    index = (tmp_path / "index.md").read_text()
    assert "- **[ft](pages/ft.md)**: filter accuracy only (--filter-only runs, no scores)" in index
    assert "- **[empty](pages/empty.md)**: no runs yet" in index
