"""benchmark.py: the sweep runner (local pool and Ray) on a fake training script, one real tiny run of v2a_iql.py, and
the report on fake exported runs checked against statistics computed by hand."""
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
        json.dump({"evals": evals}, open(os.path.join(rd, "progress.json"), "w"))
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
        names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert not names & {"ray", "rliable", "matplotlib", "benchmark"}, script


# ---- report ------------------------------------------------------------------------------------------------------------
V2A = [10, 20, 30, 40, 50, 60, 70, 80]
DVDF = [5, 15, 25, 35, 45, 55, 65, 75]


def fake_export(folder, variant: str, seed: int, score, total: int = 100, earlier: Optional[list] = None):
    """An exported run whose evaluations score `earlier` (default: `score` at step 50), then `score` at step 100
    (None: unfinished, one evaluation at step 50)."""
    d = folder / f"v2a_iql__{variant}__s{seed}"
    d.mkdir(parents=True)
    args = dict(script="v2a_iql.py", env_id="Hopper-v4", target_size=100000, source=None, source_size=1000000,
                variant=variant, seed=seed, total_steps=total, repr_steps=10, sql_steps=10, info_steps=10, eval_freq=50,
                eval_episodes=1)
    json.dump(args, open(d / "args.json", "w"))
    machine = dict(host="h", cpu="cpu", cores=2, cuda_visible=None)
    json.dump(dict(spec=dict(grid={}, launch="python benchmark.py run --sweep fx"), attempts=[
        dict(start=0, end=3600, rc=0, state="new", machine=machine)], wall_s=3600.0), open(d / "run.json", "w"))
    values = (earlier or [score or 0]) + ([score] if score is not None else [])
    steps = [50 * (i + 1) for i in range(len(values))]
    if score is not None:
        json.dump(dict(variant=variant, final_normalized_score=score, evals=[[s, 0, v] for s, v in zip(steps, values)]),
                  open(d / "results.json", "w"))
    with open(d / "curves.csv", "w") as fh:
        fh.write("tag,step,value\n" + "".join(f"eval/normalized_score,{s},{v}\n" for s, v in zip(steps, values)))
        if variant != "merged":
            fh.write("".join(f"filter/kept_frac/{n},{s},0.5\n" for n in ("gravity-0.5", "expert") for s in steps))
            fh.write("".join(f"charts/{tag},{s},0.5\n" for tag in ("q_source_rows", "awr_weight_source_share") for s in steps))
        if variant == "v2a":
            fh.write("".join(f"repr/{tag},{i},{v}\n" for i in (5, 10) for tag, v in (("rec_loss", 1 / i),
                                                                                   ("stage1_domain_probe_acc", 0.9))))
    if variant in ("v2a", "dvdf"):
        (d / "adv_hist.csv").write_text("group,right_edge,count\ngravity-0.5-expert,0.1,3\ngravity-0.5-expert,0.2,5\n")
    if variant == "v2a":
        (d / "z_pca.csv").write_text("pc1,pc2,domain,quality,var1=0.5,var2=0.2\n"
                                     "0,1,gravity-0.5,expert\n1,0,torso-hard,random\n")


def test_report_statistics_by_hand(tmp_path):
    res = tmp_path / "results" / "fx"
    for i, (a, b) in enumerate(zip(V2A, DVDF)):
        fake_export(res, "v2a", i + 1, a)
        fake_export(res, "dvdf", i + 1, b)
    fake_export(res, "igdf", 1, None)  # unfinished: counted as such, not scored
    cfg = benchmark.Report(sweep="fx", runs_root=str(tmp_path / "runs"), results_root=str(tmp_path / "results"),
                           out=str(tmp_path / "docs" / "results.md"), figures=str(tmp_path / "docs" / "results"), reps=2000)
    (task, st), = benchmark.report(cfg).items()
    assert task == ("v2a_iql", "Hopper-v4", 100000, None, 1000000)
    v, d = st["methods"]["v2a"], st["methods"]["dvdf"]
    assert "igdf" not in st["methods"]
    assert v["n"] == d["n"] == 8
    assert v["mean"] == pytest.approx(45.0) and d["mean"] == pytest.approx(40.0)
    assert v["se"] == pytest.approx(np.sqrt(600 / 8))  # sample variance of 10..80 is 600
    assert v["iqm"] == pytest.approx((30 + 40 + 50 + 60) / 4) and d["iqm"] == pytest.approx((25 + 35 + 45 + 55) / 4)
    assert 10 <= v["iqm_ci"][0] < 45 < v["iqm_ci"][1] <= 80
    wins = sum((x > y) + 0.5 * (x == y) for x in V2A for y in DVDF) / 64  # 36 / 64
    assert st["poi"][("v2a", "dvdf")]["p"] == pytest.approx(wins) == pytest.approx(0.5625)
    lo, hi = st["poi"][("v2a", "dvdf")]["ci"]
    assert 0 <= lo < wins < hi <= 1
    np.random.seed(12345)  # the bootstrap is seeded by --seed alone, whatever NumPy's global state
    assert benchmark.report(cfg)[task]["poi"][("v2a", "dvdf")]["ci"] == [lo, hi]
    md = open(cfg.out).read()
    assert "| v2a | 8 | 0 | 45.0 ± 8.7 | 45.0 [" in md and "| dvdf | 8 | 0 | 40.0 ± " in md
    assert "| igdf | 0 | 1 | – |" in md and "0.56 [" in md and "TODO (lead)" in md
    assert "`v2a` > `dvdf`: holds for the IQM only; the CIs overlap" in md
    assert "`dvdf` > `igdf`: not testable yet" in md and "(n=8) relative to `dvdf` (n=8): +12.5 % (paper: +13.7 %)" in md
    assert "python benchmark.py run --sweep fx" in md and "| 1.00 [1.00, 1.00] |" in md
    fake_export(res, "merged", 1, 1.0)  # one seed: its 'CI' is the run itself, so no verdict against it
    fake_export(res, "igdf", 2, 9.0)
    fake_export(res, "igdf", 3, 8.0)
    benchmark.report(cfg)
    md = open(cfg.out).read()
    assert "`igdf` > `merged`: not testable yet (finished seeds igdf: 2, merged: 1; a verdict needs 3 of each)" in md
    assert "`dvdf` > `igdf`: not testable yet (finished seeds dvdf: 8, igdf: 2;" in md
    assert "`target`" not in md  # no target-only run in the sweep: no line about it
    for seed, score in enumerate((90.0, 95.0, 100.0)):  # target data alone, far above every V2A seed (10..80)
        fake_export(res, "target", seed + 1, score)
    benchmark.report(cfg)
    md = open(cfg.out).read()
    assert "- `v2a` > `target`: **reversed beyond the CIs** (IQM 45.0 [" in md
    assert "relative to `target` (n=3): -52.6 %\n" in md  # (45 - 95) / 95, and no paper figure for this pair
    (res / "reading.md").write_text("V2A ends above DVDF in 5 of 8 seeds.\n")  # the hand-written reading is kept
    benchmark.report(cfg)
    md = open(cfg.out).read()
    assert "V2A ends above DVDF in 5 of 8 seeds." in md and "TODO (lead)" not in md
    pngs = sorted(os.listdir(cfg.figures))
    assert pngs == ["adv_Hopper-v4_iql_t100000.png", "curves_fx.png", "kept_Hopper-v4_iql_t100000.png",
                    "stage1_Hopper-v4_iql_t100000.png", "values_Hopper-v4_iql_t100000.png", "z_Hopper-v4_iql_t100000.png"]
    assert all(f"({os.path.basename(cfg.figures)}/{p})" in md for p in pngs)
    # every diagnostic figure is followed by its caption (the learning curves have theirs above)
    assert all(f"({os.path.basename(cfg.figures)}/{p})\n\n*" in md for p in pngs if not p.startswith("curves_"))


def test_report_evaluation_noise_table(tmp_path):
    """The second table scores each run by the mean of its last tail_evals evaluations; its sd column is the spread of
    those evaluations within a run, averaged over seeds. Checked by hand on three seeds of two methods."""
    res = tmp_path / "results" / "fx"
    for seed, (earlier, last) in enumerate([([10, 30], 20), ([40, 40], 40), ([0, 90], 60)], 1):  # v2a
        fake_export(res, "v2a", seed, last, total=150, earlier=earlier)
        fake_export(res, "dvdf", seed, 10.0 * seed, total=150, earlier=[10.0 * seed, 10.0 * seed])
    cfg = benchmark.Report(sweep="fx", runs_root=str(tmp_path / "runs"), results_root=str(tmp_path / "results"),
                           out=str(tmp_path / "docs" / "results.md"), figures=str(tmp_path / "docs" / "results"),
                           reps=500, poi_reps=200, tail_evals=2)
    (_, st), = benchmark.report(cfg).items()
    assert st["methods"]["v2a"]["mean"] == pytest.approx(40.0)  # the headline stays the last evaluation: 20, 40, 60
    v, d = st["tail"]["methods"]["v2a"], st["tail"]["methods"]["dvdf"]
    assert v["scores"] == pytest.approx([25.0, 40.0, 75.0]) and v["mean"] == pytest.approx(140 / 3)
    assert d["scores"] == pytest.approx([10.0, 20.0, 30.0]) and d["iqm"] == pytest.approx(20.0)
    assert st["tail"]["poi"][("v2a", "dvdf")]["p"] == pytest.approx(8 / 9)  # 25 loses to 30 only
    sd_v2a = np.mean([np.std([30, 20], ddof=1), 0.0, np.std([90, 60], ddof=1)])  # (7.07 + 0 + 21.21) / 3
    se_v2a = np.std([25, 40, 75], ddof=1) / np.sqrt(3)
    md = open(cfg.out).read()
    assert "mean of its last 2 evaluations" in md
    v2a_row = md.split(f"| v2a | 46.7 ± {se_v2a:.1f} | 46.7 [")[1].split("\n")[0]  # IQM of 3 seeds: their mean
    assert v2a_row.endswith(f"| – | {sd_v2a:.1f} |")
    assert md.split("| dvdf | 20.0 ± 5.8 | 20.0 [")[1].split("\n")[0].endswith(" | 0.0 |")


def test_central_range_of_pooled_histograms():
    """The advantage figure's x range: the 1st to 99th percentile of all groups (5 % padding), not the far outliers."""
    body = [(float(e), 10.0) for e in range(-5, 6)]  # 110 rows between -5 and 5
    lo, hi = benchmark.central_range([body, [(-1000.0, 1.0)], [(500.0, 1.0)]])
    assert (lo, hi) == pytest.approx((-5 - 0.5, 5 + 0.5))
    assert benchmark.central_range([[(2.0, 3.0)]]) == (1.0, 3.0)  # one bucket: a unit pad
