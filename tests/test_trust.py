"""Runs a user can trust: the datasets are the ones the flags name, --resume and --reuse-stages load only what the
current flags would compute and leave the run untouched when they refuse, a resumed run logs every step once, the
data_gen.py child never outlives the training script, training does not depend on --log-freq, and --help says what a
run does. Most runs are in-process (`main(utils.cli(Args, ...))`, as `__main__` runs them) with the tiny datasets of
conftest.py."""
import errno
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
import torch
from conftest import ROOT, SUBPROCESS_TIMEOUT

import data_gen
import v2a_iql
import v2a_td3bc
from v2a_utils import shifts

SCRIPTS = {"v2a_iql": v2a_iql, "v2a_td3bc": v2a_td3bc}
TINY = ["--repr-steps", "20", "--sql-steps", "20", "--info-steps", "20", "--total-steps", "100", "--eval-freq", "50",
        "--eval-episodes", "1", "--final-eval-episodes", "2", "--log-freq", "50", "--no-compile"]


def train(script: str, argv: list, cwd) -> str:
    """Runs the script in-process as from the command line in `cwd`; returns the newest run directory there."""
    m, old, old_argv = SCRIPTS[script], os.getcwd(), sys.argv
    os.makedirs(cwd, exist_ok=True)
    os.chdir(cwd)
    sys.argv = [f"{script}.py"]  # the program name in error messages, as on the command line
    try:
        m.main(m.utils.cli(m.Args, m.DESCRIPTION, [str(a) for a in argv]))  # as __main__ parses the command line
    finally:
        os.chdir(old)
        sys.argv = old_argv
    return max(glob.glob(os.path.join(cwd, "runs", "*")), key=os.path.getmtime)


def refused(script: str, argv: list, cwd) -> str:
    """The one-line error of a run that must not start."""
    with pytest.raises(SystemExit) as e:
        train(script, argv, cwd)
    msg = str(e.value)
    assert msg.startswith(f"{script}.py: error: ") and "\n" not in msg, msg
    return msg


def snapshot(folder) -> dict:
    """Every file of a run folder but its lock file, which holds the pid of the last process that checked the run."""
    return {os.path.relpath(p, folder): open(p, "rb").read() for p in glob.glob(os.path.join(folder, "**"), recursive=True)
            if os.path.isfile(p) and os.path.basename(p) != ".v2a-run.lock"}


def copy_run(run_dir: str, tmp_path) -> str:
    return shutil.copytree(run_dir, os.path.join(tmp_path, "runs", os.path.basename(run_dir)))


@pytest.fixture(scope="module")
def iql_run(tiny_data, tmp_path_factory) -> str:
    """A finished tiny v2a run of v2a_iql.py (stages 1-5, evaluations at 50 and 100); tests work on copies."""
    return train("v2a_iql", tiny_data["base_args"] + TINY, tmp_path_factory.mktemp("iql_run"))


@pytest.fixture(scope="module")
def other_data(tiny_data, tmp_path_factory) -> str:
    """The tiny datasets under the same ids, regenerated with data seed 5: other data that the flags cannot tell."""
    path = str(tmp_path_factory.mktemp("other_data"))
    shutil.copytree(tiny_data["minari_path"], path, dirs_exist_ok=True)
    env = dict(os.environ, MINARI_DATASETS_PATH=path, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    subprocess.run([sys.executable, "data_gen.py", *tiny_data["base_args"], "--seed", "5", "--overwrite",
                    "--ref-min-episodes", "5", "--ref-max-episodes", "2"], cwd=ROOT, env=env, check=True,
                   capture_output=True, timeout=SUBPROCESS_TIMEOUT)
    return path


@pytest.fixture(scope="module")
def dvdf_run_on_other_data(tiny_data, other_data, tmp_path_factory) -> str:
    os.environ["MINARI_DATASETS_PATH"] = other_data
    try:
        return train("v2a_iql", tiny_data["base_args"] + TINY + ["--variant", "dvdf"], tmp_path_factory.mktemp("dvdf"))
    finally:
        os.environ["MINARI_DATASETS_PATH"] = tiny_data["minari_path"]


# ---- 1. every dataset is the one its flags name -------------------------------------------------------------------
def edit_record(path, ds_id, **changes):
    meta_path = os.path.join(path, ds_id, "data", "metadata.json")
    meta = json.load(open(meta_path))
    record = {**json.loads(meta.pop("v2a_generation")), **changes}
    json.dump({**meta, **({"v2a_generation": json.dumps(record)} if changes else {})}, open(meta_path, "w"))


def truncate(path):
    with open(path, "r+b") as fh:
        fh.truncate(os.path.getsize(path) // 2)


def poke(path, ds_id, field, value):
    """One value of an episode's `field` in a dataset's HDF5 file replaced, e.g. by a NaN."""
    with h5py.File(os.path.join(path, ds_id, "data", "main_data.hdf5"), "r+") as f:
        f["episode_1"][field][3, ...] = value


DATASET_CASES = {  # name: (edit of a copy of the datasets, source spec, expected message)
    "other mixture, same ids": (None, "gravity-0.5:expert,torso-hard:random,legjnt-hard:medium",
                                "was generated with other arguments: mixture 'torso-hard:random,"),
    "other size, same id": (lambda p, src, tgt: edit_record(p, src[1], transitions=1001), None,
                            "was generated with other arguments: transitions 1001 (the flags imply 1000)"),
    "no generation record": (lambda p, src, tgt: edit_record(p, tgt), None, "has no generation record"),
    "truncated file": (lambda p, src, tgt: truncate(os.path.join(p, src[0], "data", "main_data.hdf5")), None,
                       "cannot be"),
    "NaN in the target's states": (lambda p, src, tgt: poke(p, tgt, "observations", np.nan), None,
                                   "holds NaN or infinite values (in its observations)"),
    "inf in a source's rewards": (lambda p, src, tgt: poke(p, src[2], "rewards", np.inf), None,
                                  "holds NaN or infinite values (in its rewards)"),
}


@pytest.mark.parametrize("case", DATASET_CASES)
@pytest.mark.parametrize("script", SCRIPTS)
def test_dataset_must_match_its_flags(script, case, tiny_data, tmp_path, monkeypatch):
    edit, source, message = DATASET_CASES[case]
    src, tgt = data_gen.dataset_ids(tiny_data["env_id"], tiny_data["source"], 3000, 1000)
    if edit:
        path = shutil.copytree(tiny_data["minari_path"], tmp_path / "minari")
        edit(path, src, tgt)
        monkeypatch.setenv("MINARI_DATASETS_PATH", str(path))
    argv = tiny_data["base_args"] + TINY + ["--no-generate"] + (["--source", source] if source else [])
    msg = refused(script, argv, tmp_path)
    assert message in msg and "data_gen.py" in msg and "--overwrite" in msg and "MINARI_DATASETS_PATH" in msg
    assert any(ds_id in msg for ds_id in src + [tgt]) and not os.path.exists(tmp_path / "runs")


# ---- 2. --resume and --reuse-stages load only what the flags would compute; a refusal writes nothing ---------------
RESUME_CASES = {  # name: (script, extra flags, damage to the run copy, use the other data, expected message)
    "seed": ("v2a_iql", ["--seed", "2"], None, False, "was made with other flags: --seed 1 (now 2)"),
    "xi, tradeoff": ("v2a_iql", ["--xi", "0.25", "--tradeoff", "0.3"], None, False,
                     "--tradeoff None (now 0.3), --xi 0.5 (now 0.25)"),
    "source size": ("v2a_iql", ["--source-size", "3003"], None, False, "--source-size 3000 (now 3003)"),
    "stage budget": ("v2a_iql", ["--info-steps", "30"], None, False, "--info-steps 20 (now 30)"),
    "smaller total": ("v2a_iql", ["--total-steps", "50"], None, False, "--total-steps 100 (now 50; it may only grow)"),
    "other script": ("v2a_td3bc", [], None, False, "that run was made by v2a_iql.py; resume it with python v2a_iql.py"),
    "no args.json": ("v2a_iql", [], "args.json", False, "args.json"),
    "truncated stage3.pt": ("v2a_iql", [], "stage3.pt", False, "stage3.pt cannot be read"),
    "truncated stage5.pt": ("v2a_iql", [], "stage5.pt", False, "stage5.pt cannot be read"),
    "other data": ("v2a_iql", [], None, True, "stage1.pt was trained with other settings: stage1.data.v2a/hopper-v4"),
}


@pytest.mark.parametrize("case", RESUME_CASES)
def test_failed_resume_leaves_run_untouched(case, iql_run, tiny_data, other_data, tmp_path, monkeypatch):
    script, extra, damage, use_other_data, message = RESUME_CASES[case]
    run_dir = copy_run(iql_run, tmp_path)
    if damage == "args.json":
        os.remove(os.path.join(run_dir, damage))
    elif damage:
        truncate(os.path.join(run_dir, damage))
    if use_other_data:
        monkeypatch.setenv("MINARI_DATASETS_PATH", other_data)
    before = snapshot(run_dir)
    msg = refused(script, tiny_data["base_args"] + TINY + extra + ["--resume", run_dir], tmp_path)
    assert message in msg and snapshot(run_dir) == before and os.listdir(tmp_path / "runs") == [os.path.basename(run_dir)]


def test_resume_alone_takes_the_runs_own_flags(iql_run, tmp_path):
    """`--resume DIR` alone continues the run with the flags of its args.json (tiny datasets and budgets here, not the
    defaults); a flag given with another value than the run's is still refused, a larger --total-steps is not."""
    run_dir = copy_run(iql_run, tmp_path)
    before = snapshot(run_dir)
    msg = refused("v2a_iql", ["--resume", run_dir, "--seed", "2"], tmp_path)
    assert "was made with other flags: --seed 1 (now 2); leave those flags out" in msg and "--source-size" not in msg
    assert snapshot(run_dir) == before
    train("v2a_iql", ["--resume", run_dir, "--total-steps", "150"], tmp_path)
    assert torch.load(os.path.join(run_dir, "stage5.pt"), weights_only=False)["step"] == 150


def test_resume_alone_of_a_run_older_than_a_flag(tiny_data, tmp_path):
    """A run whose args.json predates a flag (--normalize-states and --reward-scale absent) continues with the value
    that the run's code had before the flag existed (NEW_FLAG_DEFAULTS), not with today's default."""
    argv = tiny_data["base_args"] + TINY + ["--variant", "target", "--no-normalize-states", "--reward-scale", "none"]
    run_dir = train("v2a_iql", argv + ["--total-steps", "50"], tmp_path)
    path = os.path.join(run_dir, "args.json")
    old = {k: v for k, v in json.load(open(path)).items() if k not in ("normalize_states", "reward_scale")}
    json.dump(old, open(path, "w"))
    train("v2a_iql", ["--resume", run_dir], tmp_path)  # the run's own --total-steps: nothing left but its evaluation
    train("v2a_iql", ["--resume", run_dir, "--total-steps", "100"], tmp_path)
    assert torch.load(os.path.join(run_dir, "stage5.pt"), weights_only=False)["step"] == 100
    assert {k: json.load(open(path))[k] for k in ("normalize_states", "reward_scale")} == {
        "normalize_states": False, "reward_scale": "none"}


def read_only_error(path) -> OSError:
    return OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))


def test_a_read_only_working_directory_is_one_line(tiny_data, tmp_path, monkeypatch):
    """runs/ cannot be made (simulated where it is made: the tests run as root, whom chmod does not stop): one line
    naming the folder, and nothing trains."""
    makedirs = os.makedirs
    def read_only(path, *a, **kw):
        if str(path).startswith("runs"):
            raise read_only_error(path)
        return makedirs(path, *a, **kw)
    monkeypatch.setattr(os, "makedirs", read_only)
    msg = refused("v2a_iql", tiny_data["base_args"] + TINY + ["--variant", "target"], tmp_path)
    assert "cannot write the run folder runs/Hopper-v4__v2a_iql__target__1__" in msg and "Read-only file system" in msg
    assert "working directory" in msg and not os.path.exists(tmp_path / "runs")


def test_resume_of_a_read_only_run_is_one_line(iql_run, tmp_path, monkeypatch):
    """--resume of a run on a read-only file system (simulated: every file of the run opened for writing fails as
    there): one line that says what to do, and the run is untouched."""
    run_dir, real_open = copy_run(iql_run, tmp_path), open
    before = snapshot(run_dir)
    def read_only(file, mode="r", *a, **kw):
        if set(mode) & set("wax+") and os.path.abspath(str(file)).startswith(run_dir):
            raise read_only_error(file)
        return real_open(file, mode, *a, **kw)
    monkeypatch.setattr("builtins.open", read_only)
    msg = refused("v2a_iql", ["--resume", run_dir, "--total-steps", "150"], tmp_path)
    monkeypatch.undo()
    assert f"cannot write the run folder {run_dir} (OSError: [Errno 30] Read-only file system" in msg
    assert "make it writable" in msg
    assert snapshot(run_dir) == before


def test_a_checkpoint_that_cannot_be_written_is_one_line(tiny_data, tmp_path, monkeypatch):
    """A stage-5 checkpoint that cannot be written (a full disk, as torch.save reports it): one line that names the file
    and the way on."""
    def full_disk(obj, path, *a, **kw):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    monkeypatch.setattr(torch, "save", full_disk)
    msg = refused("v2a_iql", tiny_data["base_args"] + TINY + ["--variant", "target"], tmp_path)
    assert "cannot write runs/Hopper-v4__v2a_iql__target__1__" in msg and "/stage5.pt (RuntimeError: [enforce fail" in msg
    assert "continue the run with --resume runs/Hopper-v4__v2a_iql__target__1__" in msg


def test_results_that_cannot_be_written_are_one_line(tiny_data, tmp_path, monkeypatch):
    """results.json that cannot be written after training (a full disk): one line naming the file and the way on, and
    that way works: --resume repeats only the final evaluation and writes it."""
    replace = os.replace
    def full_disk(src, dst):
        if str(dst).endswith("results.json"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))
        return replace(src, dst)
    monkeypatch.setattr(os, "replace", full_disk)
    msg = refused("v2a_iql", tiny_data["base_args"] + TINY + ["--variant", "target"], tmp_path)
    monkeypatch.undo()
    assert "/results.json (no space left on device)" in msg and "training is done" in msg
    run_dir = str(tmp_path / msg.split("--resume ")[-1].split(" ")[0])
    assert not os.path.exists(os.path.join(run_dir, "results.json")) and not glob.glob(os.path.join(run_dir, "*.tmp"))
    train("v2a_iql", ["--resume", run_dir], tmp_path)
    results = json.load(open(os.path.join(run_dir, "results.json")))
    assert results["final_eval"]["step"] == torch.load(os.path.join(run_dir, "stage5.pt"), weights_only=False)["step"]


REUSE_CASES = {  # name: (script, flags, reuse the dvdf run made on other data, expected message)
    "dvdf from a v2a run": ("v2a_iql", ["--variant", "dvdf"], False, "stage3.pt was trained with other settings"),
    "igdf from a v2a run": ("v2a_iql", ["--variant", "igdf"], False, "stage4.pt was trained with other settings"),
    "other repr budget": ("v2a_iql", ["--repr-steps", "30"], False, "stage1.repr_steps 20 (now 30)"),
    "other z dim": ("v2a_iql", ["--z-dim", "64"], False, "stage1.z_dim 128 (now 64)"),
    "other seed, other script": ("v2a_td3bc", ["--seed", "2"], False, "seed 1 (now 2)"),
    "dvdf on other data": ("v2a_iql", ["--variant", "dvdf"], True, "stage3.data.v2a/hopper-v4/source/"),
    "v2a from a dvdf run": ("v2a_iql", [], True, "has no stage1.pt, which the v2a variant needs"),
}


@pytest.mark.parametrize("case", REUSE_CASES)
def test_reuse_stages_refuses_other_settings(case, iql_run, dvdf_run_on_other_data, tiny_data, tmp_path):
    script, extra, from_dvdf, message = REUSE_CASES[case]
    reused = dvdf_run_on_other_data if from_dvdf else iql_run
    before = snapshot(reused)
    msg = refused(script, tiny_data["base_args"] + TINY + extra + ["--reuse-stages", reused], tmp_path)
    assert message in msg and snapshot(reused) == before and not os.path.exists(tmp_path / "runs")
    if "other data" in case:
        assert ".seed 5 (now 0)" in msg  # the data seed is what differs


def test_checkpoints_of_a_removed_flag_at_its_default_stay_valid(iql_run, tiny_data, tmp_path):
    """--bf16 was removed; stages saved by the code that had it carry bf16 in their keys: at its default (False) they
    are reused, made with --bf16 they are refused."""
    def with_bf16(value) -> str:
        run = copy_run(iql_run, tmp_path / f"old_{value}")
        for p in glob.glob(os.path.join(run, "stage[1-4].pt")):
            ck = torch.load(p, weights_only=False)
            ck["key"]["stage1"]["bf16"] = value  # every later stage's key holds stage 1's
            torch.save(ck, p)
        return run

    assert train("v2a_iql", tiny_data["base_args"] + TINY + ["--reuse-stages", with_bf16(False)], tmp_path / "a")
    msg = refused("v2a_iql", tiny_data["base_args"] + TINY + ["--reuse-stages", with_bf16(True)], tmp_path / "b")
    assert "stage1.bf16 True (now <absent>)" in msg


def logged_steps(run_dir) -> dict:
    """(kind, tag) -> every step logged, as TensorBoard reads the run (all event files, no purging)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(run_dir, size_guidance={"scalars": 0, "histograms": 0, "tensors": 0},
                           purge_orphaned_data=False)
    acc.Reload()
    read = {"scalars": acc.Scalars, "histograms": acc.Histograms, "tensors": acc.Tensors}
    return {(kind, tag): [e.step for e in read[kind](tag)] for kind in read for tag in acc.Tags()[kind]}


@pytest.mark.parametrize("interrupted", ["stage 5 after its checkpoint", "stage 4"])
def test_resume_logs_every_step_once(interrupted, iql_run, tiny_data, tmp_path):
    run_dir, argv = copy_run(iql_run, tmp_path), tiny_data["base_args"] + TINY
    if interrupted == "stage 4":  # stage 4 was running: no stage4.pt, no stage5.pt, its losses partly logged
        for name in ("stage4.pt", "stage5.pt", "results.json"):
            os.remove(os.path.join(run_dir, name))
        steps = 100
    else:  # logged up to step 150, killed before its checkpoint at 150: the checkpoint is at 100
        checkpoint_100 = open(os.path.join(run_dir, "stage5.pt"), "rb").read()
        train("v2a_iql", argv + ["--total-steps", "150", "--resume", run_dir], tmp_path)
        open(os.path.join(run_dir, "stage5.pt"), "wb").write(checkpoint_100)
        steps = 150
    train("v2a_iql", argv + ["--total-steps", steps, "--resume", run_dir], tmp_path)
    logged = logged_steps(run_dir)
    assert logged[("scalars", "losses/info_loss")] == [20] and logged[("scalars", "repr/rec_loss")] == [5, 10, 15, 20]
    assert logged[("scalars", "repr/stage1_domain_probe_acc")] == [20]  # --repr-steps 20 < --log-freq: the last step
    assert logged[("scalars", "eval/return")] == list(range(50, steps + 1, 50))
    assert ("scalars", "charts/awr_weight_source_share") in logged and ("scalars", "charts/q_source_rows") in logged
    for (kind, tag), at in logged.items():
        assert len(at) == len(set(at)), f"{kind} {tag} logged twice at some step: {at}"
    assert [e[0] for e in json.load(open(os.path.join(run_dir, "results.json")))["evals"]] == list(range(50, steps + 1, 50))


# ---- training does not depend on logging ----------------------------------------------------------------------------
def test_log_freq_does_not_change_training(iql_run, tiny_data, tmp_path):
    """Stages 1-4 reused from the v2a_iql.py run (the keys of stages 1-4 are script-independent), then stage 5 of
    v2a_td3bc.py with filter diagnostics every 10 or every 50 steps: the same final weights, bit for bit."""
    final = []
    for log_freq in (10, 50):
        run_dir = train("v2a_td3bc", tiny_data["base_args"] + TINY + ["--log-freq", log_freq, "--reuse-stages", iql_run],
                        tmp_path / str(log_freq))
        final.append(torch.load(os.path.join(run_dir, "stage5.pt"), weights_only=False))
    for net in ("actor", "qf", "actor_target", "qf_target"):
        for name, w in final[0][net].items():
            assert torch.equal(w, final[1][net][name]), f"{net}.{name} depends on --log-freq"


def test_resume_equals_uninterrupted_run(iql_run, tiny_data, tmp_path):
    """A run stopped after its stage-5 checkpoint at step 50 and continued with --resume ends with the weights and the
    optimizer state of the run that was not stopped, bit for bit. (v2a_td3bc.py: without an lr schedule, a 50-step
    run continued to 100 steps is exactly a 100-step run interrupted at 50.)"""
    argv = tiny_data["base_args"] + TINY
    whole = train("v2a_td3bc", argv + ["--reuse-stages", iql_run], tmp_path / "whole")
    half = train("v2a_td3bc", argv + ["--reuse-stages", iql_run, "--total-steps", "50"], tmp_path / "half")
    train("v2a_td3bc", argv + ["--resume", half], tmp_path / "half")
    a, b = (torch.load(os.path.join(d, "stage5.pt"), weights_only=False) for d in (whole, half))
    assert a["step"] == b["step"] == 100
    for net in ("actor", "qf", "actor_target", "qf_target"):
        for name, w in a[net].items():
            assert torch.equal(w, b[net][name]), f"{net}.{name} differs after --resume"
    for opt_a, opt_b in zip(a["opts"], b["opts"]):
        for state_a, state_b in zip(opt_a["state"].values(), opt_b["state"].values()):
            assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)


# ---- the data_gen.py child ------------------------------------------------------------------------------------------
def children(pid: int) -> list[int]:
    out = []
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            fields = open(stat).read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.split("/")[2]))
    return out


def cmdline(pid: int) -> str:
    """A process's command line; empty when it has ended meanwhile (short-lived children come and go)."""
    try:
        with open(f"/proc/{pid}/cmdline") as fh:
            return fh.read()
    except OSError:
        return ""


def alive(pid: int) -> bool:
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_during_generation_stops_the_child(sig, tmp_path):
    env = dict(os.environ, MINARI_DATASETS_PATH=str(tmp_path / "minari"), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "v2a_iql.py"), "--source-size", "300000",
                             "--target-size", "200000"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline, kids = time.time() + 120, []
        while not kids and time.time() < deadline and proc.poll() is None:
            time.sleep(0.5)
            kids = [k for k in children(proc.pid) if "data_gen.py" in cmdline(k)]
        if not kids:
            proc.kill()  # before reading its output: it would otherwise go on to a paper-scale generation
            raise AssertionError(f"no data_gen.py child appeared: {proc.communicate()}")
        time.sleep(2)  # the child is busy importing or collecting
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    assert err.strip().splitlines() == [err.strip()] and err.startswith(f"v2a_iql.py: error: {sig.name} while data_gen.py")
    deadline = time.time() + 20
    while any(map(alive, kids)) and time.time() < deadline:
        time.sleep(0.5)
    assert not any(map(alive, kids)), "data_gen.py outlived the training script"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stopped_run_names_its_resume_command(sig, tiny_data, tmp_path):
    """The run folder and the whole run's estimate are printed when the run starts; Ctrl-C or SIGTERM (a scheduler's,
    kill's) during training ends it with one line: the command that continues it."""
    env = dict(os.environ, MINARI_DATASETS_PATH=tiny_data["minari_path"], OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "v2a_iql.py"), *tiny_data["base_args"], *TINY,
                             "--variant", "target", "--total-steps", "10000000"], cwd=tmp_path, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,  # Ctrl-C as in a terminal, also where
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # the tests run as a job
    lines = []
    try:
        while not any(line.startswith("[stage 5") for line in lines) and (line := proc.stdout.readline()):
            lines.append(line)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    out = "".join(lines)
    folder = re.search(r"^run folder: (\S+); if it stops, continue it with: python ", out, re.M)
    assert folder and os.path.isdir(tmp_path / folder[1]) and "\nestimate (rough): about " in out, out + err
    assert proc.returncode != 0 and err.strip().splitlines() == [err.strip()], err
    assert err.startswith(f"v2a_iql.py: error: {sig.name}: stopped; continue the run with python ")
    assert f"v2a_iql.py --resume {folder[1]} (stage 5 restarts from its last evaluation" in err


def test_data_gen_error_is_the_trainers_error(tmp_path):
    """Without the behaviour policies (a copy of the scripts, no policies/), data_gen.py's one-line error, which says
    how to train them, is the training script's one line. Every module is copied: the script's folder comes first on
    sys.path, so none is imported from the installed project, whose data_gen.py would find the committed policies."""
    for name in ("v2a_iql.py", "data_gen.py"):
        shutil.copy(os.path.join(ROOT, name), tmp_path)
    shutil.copytree(os.path.join(ROOT, "v2a_utils"), tmp_path / "v2a_utils", ignore=shutil.ignore_patterns("__pycache__"))
    env = dict(os.environ, MINARI_DATASETS_PATH=str(tmp_path / "minari"), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "v2a_iql.py", "--env-id", "Walker2d-v4", "--source-size", "3000",
                           "--target-size", "1000"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=SUBPROCESS_TIMEOUT)
    assert proc.returncode != 0 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith("v2a_iql.py: error: data_gen.py: error: ") and "behaviour polic" in proc.stderr
    assert "--train-domain" in proc.stderr


# ---- --help and the device ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("script", SCRIPTS)
def test_help_describes_the_run(script):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, f"{script}.py"), "--help"], capture_output=True, text=True,
                          timeout=SUBPROCESS_TIMEOUT,
                          env=dict(os.environ, COLUMNS="200"))
    assert proc.returncode == 0
    text = " ".join(proc.stdout.split())
    for needle in [*shifts.SUPPORTED_ENV_IDS, f"python {script}.py --env-id Hopper-v4", "about 4.5 hours", "2-core CPU",
                   "--repr-steps 5000 --sql-steps 30000 --total-steps 100000"]:
        assert needle in text, needle


def test_a_flag_tyro_rejects_is_one_line(monkeypatch):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "v2a_iql.py"), "--variant", "bogus"], capture_output=True,
                          text=True, timeout=SUBPROCESS_TIMEOUT, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode != 0 and proc.stderr.strip().splitlines() == [proc.stderr.strip()], proc.stderr
    assert proc.stderr.startswith("v2a_iql.py: error: invalid choice 'bogus' for argument '--variant'. Expected one of "
                                  "('v2a', 'dvdf', 'igdf', 'merged', 'target', 'bc'); python v2a_iql.py --help lists")
    monkeypatch.setattr(sys, "argv", ["v2a_td3bc.py"])
    with pytest.raises(SystemExit) as e:
        v2a_td3bc.utils.cli(v2a_td3bc.Args, v2a_td3bc.DESCRIPTION, ["--seeed", "2"])
    assert str(e.value) == ("v2a_td3bc.py: error: Unrecognized options: --seeed, 2 (perhaps --seed); python v2a_td3bc.py "
                            "--help lists the flags")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA machine")
def test_cuda_unavailable_says_cpu(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))
    refused("v2a_iql", ["--cuda", "--no-generate"], tmp_path)
    assert "CUDA not available: running on CPU" in capsys.readouterr().out
