"""data_gen.py: shifted domains, behaviour-policy files, and the Minari datasets it writes."""
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import minari
import numpy as np
import pytest
import torch
from conftest import ROOT, SUBPROCESS_TIMEOUT, TINY, run_script

import data_gen as dg
from v2a_utils import behaviour, mixtures, processes, shifts


def first_divergence(env_id: str, domain: str, steps: int = 300) -> float:
    """Largest next-state difference between the nominal and the shifted env, both stepped from the same state
    with the same action, along a random nominal rollout."""
    nominal, shifted = dg.make_domain_env(env_id, "nominal"), dg.make_domain_env(env_id, domain)
    rng = np.random.default_rng(0)
    shifted.reset(seed=0)
    model = nominal.unwrapped.model
    hinge = model.jnt_limited.astype(bool)  # start from postures anywhere in the nominal joint ranges

    def reset():
        nominal.reset(seed=int(rng.integers(1 << 30)))
        qpos = nominal.unwrapped.data.qpos.copy()
        qpos[model.jnt_qposadr[hinge]] = rng.uniform(*model.jnt_range[hinge].T)
        nominal.unwrapped.set_state(qpos, nominal.unwrapped.data.qvel)

    reset()
    worst = 0.0
    for _ in range(steps):
        qpos, qvel = nominal.unwrapped.data.qpos.copy(), nominal.unwrapped.data.qvel.copy()
        action = rng.uniform(-1, 1, nominal.action_space.shape)
        shifted.unwrapped.set_state(qpos, qvel)
        next_shifted = shifted.step(action)[0]
        next_nominal, _, term, _, _ = nominal.step(action)
        worst = max(worst, float(np.abs(next_shifted - next_nominal).max()))
        if term:
            reset()
    return worst


@pytest.mark.parametrize("domain", ["gravity-2.0", "friction-0.1", "legjnt-hard", "footjnt-medium", "torso-hard",
                                    "foot-easy"])
def test_shift_changes_next_state(domain):
    assert first_divergence("Hopper-v4", "nominal") < 1e-12  # the comparison itself is exact
    assert first_divergence("Hopper-v4", domain) > 1e-3


@pytest.mark.parametrize("env_id,domains", [("Walker2d-v5", ["thighjnt-hard", "foot-hard"]),
                                            ("HalfCheetah-v4", ["footjnt-hard", "torso-medium"]),
                                            ("Ant-v5", ["hipjnt-hard", "halflegs-hard", "gravity-0.5"])])
def test_shift_changes_next_state_other_robots(env_id, domains):
    for domain in domains:
        assert first_divergence(env_id, domain, steps=60) > 1e-3, domain


@pytest.mark.parametrize("env_id", shifts.SUPPORTED_ENV_IDS)
def test_spaces_equal_target(env_id):
    target = dg.make_domain_env(env_id, "nominal")
    robot = dg.robot_of(env_id)
    assert target.observation_space.shape == {"Hopper": (11,), "Walker2d": (17,), "HalfCheetah": (17,),
                                              "Ant": (27,)}[robot]
    for domain in dg.domain_names(robot):
        env = dg.make_domain_env(env_id, domain)
        assert env.observation_space == target.observation_space, domain
        assert env.action_space == target.action_space, domain
        assert env.spec.max_episode_steps == 1000


def test_joint_range_scaling():
    assert shifts._scale_joint_range(-150, 0, 0.2) == (-30, 0)            # ODRL Hopper leg, hard
    assert shifts._scale_joint_range(-45, 45, 0.8) == (-36, 36)            # ODRL Hopper foot, easy
    assert shifts._scale_joint_range(30, 70, 0.5) == (30, 50)              # Ant ankle: keep the inner bound
    assert shifts._scale_joint_range(-70, -30, 0.5) == (-50, -30)


def test_parse_source():
    # without `@`, each entry is collected by its own domain's policy
    assert dg.parse_source("torso-hard:random, gravity-0.5:medium:2") == [("torso-hard", "random", 1.0, "torso-hard"),
                                                                          ("gravity-0.5", "medium", 2.0, "gravity-0.5")]
    assert dg.parse_source("a:expert:1e3,b:random:0.5") == [("a", "expert", 1000.0, "a"), ("b", "random", 0.5, "b")]
    for bad in ["torso-hard", "torso-hard:good", "a:random:-1", "a:random:0", "a:random:x", "a:random:inf",
                "a:random:nan", "a:random:-inf", "a:random:1:2"]:
        with pytest.raises(dg.DataGenError, match="^malformed source entry"):
            dg.parse_source(bad)
    with pytest.raises(dg.DataGenError):
        dg.parse_source("")


def test_dataset_ids_are_exact():
    assert [mixtures.size_tag(n) for n in (333333, 30000, 30500, 5000, 1000, 999)] == ["333333", "30k", "30500", "5k",
                                                                                 "1k", "999"]
    src, tgt = dg.dataset_ids("Hopper-v4", "gravity-0.5:random,torso-hard:expert", 1_000_000, 5000)
    assert src == ["v2a/hopper-v4/source/gravity0p5-random-500k-v0", "v2a/hopper-v4/source/torsohard-expert-500k-v0"]
    assert tgt == "v2a/hopper-v4/target/medium-5k-v0"
    src, _ = dg.dataset_ids("Hopper-v4", mixtures.default_source("Hopper-v4"), 1_000_000, 100_000)
    assert src[1] == "v2a/hopper-v4/source/gravity0p5-expert-333333-v0"
    # two sizes that used to share a tag no longer share an id
    assert dg.dataset_ids("Hopper-v4", "a:random", 30000, 1)[0] != dg.dataset_ids("Hopper-v4", "a:random", 30500, 1)[0]


@pytest.mark.parametrize("env_id", shifts.SUPPORTED_ENV_IDS)
def test_default_source_per_robot(env_id):
    robot = dg.robot_of(env_id)
    assert mixtures.default_source(env_id) == mixtures.DEFAULT_SOURCES[robot]
    entries = dg.parse_source(mixtures.default_source(env_id))
    assert sorted(e.quality for e in entries) == ["expert", "medium", "random"]
    for entry in entries:
        dg.check_domain(robot, entry.domain)
        assert entry.policy == entry.domain  # each collected by its own domain's policy
    assert dg.Args().source is None  # resolved per robot in main()


def test_named_source_resolves():
    crossed = mixtures.NAMED_SOURCES["Hopper"]["crossed"]
    for env_id in ("Hopper-v4", "Hopper-v5"):
        assert dg.resolve_source(env_id, "crossed") == crossed
        assert dg.resolve_source(env_id, None) == mixtures.DEFAULT_SOURCES["Hopper"]
    assert dg.resolve_source("Hopper-v4", "gravity-0.5:expert") == "gravity-0.5:expert"  # entries stay entries
    assert dg.resolve_source("Walker2d-v4", "crossed") == "crossed"  # not Walker2d's: parse_source says so, one line
    with pytest.raises(dg.DataGenError, match="^malformed source entry 'crossed'.*named mixture: crossed \\(Hopper\\)$"):
        dg.parse_source(dg.resolve_source("Walker2d-v4", "crossed"))
    # a name and its entries name the same datasets
    assert (dg.dataset_ids("Hopper-v4", dg.resolve_source("Hopper-v4", "crossed"), 1_000_000, 5000)[0]
            == ["v2a/hopper-v4/source/gravity0p5-medium-250k-v0", "v2a/hopper-v4/source/gravity0p5-expert-250k-v0",
                "v2a/hopper-v4/source/legjnthard-medium-250k-v0", "v2a/hopper-v4/source/legjnthard-expert-250k-v0"])


@pytest.mark.parametrize("robot,name", [(r, n) for r, names in mixtures.NAMED_SOURCES.items() for n in names])
def test_crossed_structure(robot, name):
    """Domain and behaviour quality crossed, not confounded: two or more domains with two or more qualities each, a
    quality in two or more domains; every policy it needs is committed."""
    entries = dg.parse_source(mixtures.NAMED_SOURCES[robot][name])
    qualities = {e.domain: {x.quality for x in entries if x.domain == e.domain} for e in entries}
    assert sum(len(q) >= 2 for q in qualities.values()) >= 2
    assert any(sum(q in qs for qs in qualities.values()) >= 2 for q in mixtures.QUALITIES)
    for domain, quality, _, _ in entries:
        dg.check_domain(robot, domain)
        assert quality == "random" or os.path.exists(os.path.join(ROOT, "policies", robot.lower(), f"{domain}.pt"))
    validate(env_id=f"{robot}-v4", source=name, source_size=1_000_000, target_size=5000)


@pytest.mark.parametrize("script", ["v2a_iql", "v2a_td3bc"])
def test_trainers_accept_named_source(script):
    import importlib

    from conftest import validate_args
    m = importlib.import_module(script)
    args = m.Args(env_id="Hopper-v4", source="crossed")
    validate_args(m, args)
    assert args.source == mixtures.NAMED_SOURCES["Hopper"]["crossed"]  # what run_data_gen passes on and the ids derive from


def test_crossed_quality_values_differ():
    """The structure `crossed` is there for, measured with the committed policies: the same quality is worth different
    returns in the two domains (docs/data_gen.md, "Named mixtures", has the 20-episode table)."""
    args = dg.Args(source=mixtures.NAMED_SOURCES["Hopper"]["crossed"], measure_episodes=2, ref_min_episodes=2,
                   ref_max_episodes=1)
    rows = {(r["domain"], r["quality"]): r["deterministic"].mean() for r in behaviour.measure(args, "Hopper")}
    for quality in ("medium", "expert"):
        assert rows[("legjnt-hard", quality)] > 1.5 * rows[("gravity-0.5", quality)]
    # by return, gravity-0.5's expert data sit between legjnt-hard's medium and expert data, nearer the medium
    assert rows[("legjnt-hard", "medium")] < rows[("gravity-0.5", "expert")] < rows[("legjnt-hard", "expert")] / 1.5


def validate(**kwargs):
    args = dg.Args(**kwargs)
    args.source = dg.resolve_source(args.env_id, args.source)  # as main() does
    dg.validate_args(args, dg.robot_of(args.env_id))


@pytest.mark.parametrize("kwargs,message", [
    (dict(seed=-1), "--seed -1"),
    (dict(seed=2 ** 31), "--seed 2147483648: must lie in [0, 2^31), as for the training scripts"),
    (dict(policy_steps=0), "--policy-steps 0"),
    (dict(policy_eval_freq=0), "--policy-eval-freq 0"),
    (dict(policy_steps=1000, policy_eval_freq=2000), "between 1 and --policy-steps (1000)"),
    (dict(ref_min_episodes=0), "--ref-min-episodes 0"),
    (dict(ref_max_episodes=-3), "--ref-max-episodes -3"),
    (dict(threads=0), "--threads 0"),
    (dict(target_size=0), "--target-size 0"),
    (dict(source_size=-5), "--source-size -5: must be a positive number of transitions; the minimum --source-size "
                           "for this mixture is 3"),
    (dict(source_size=0), "--source-size 0: must be a positive number of transitions"),
    (dict(measure_episodes=-1), "--measure-episodes -1"),
    (dict(source="crossed", env_id="Walker2d-v4"), "or a named mixture: crossed (Hopper)"),
    (dict(source="a-hard:random"), "unknown shift"),
    (dict(source="nominal:random"), "shifted domains only"),
    (dict(source="torso-hard:random:1,gravity-0.5:expert:1e-3", source_size=1000),
     "'gravity-0.5:expert:0.001' would get no transition (int(1000 * 0.001 / 1.001) = 0); the minimum --source-size "
     "for this mixture is 1001"),
    (dict(source="torso-hard:random:1e308,gravity-0.5:expert:1e308"), "the weights sum to infinity"),
    (dict(target_size=10_000_001), "above the cap of 10,000,000 per dataset"),
    (dict(env_id="Ant-v5", source_size=10 ** 12), "GB on disk"),
    (dict(train_domain="moon-gravity"), "unknown shift 'moon-gravity'"),
])
def test_validate_args(kwargs, message):
    with pytest.raises(dg.DataGenError) as e:
        validate(**kwargs)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_validate_args_accepts_edges():
    validate(source_size=3, target_size=1, policy_steps=1, policy_eval_freq=1, seed=2 ** 31 - 1)
    validate(source_size=30_000_000, target_size=10_000_000)  # exactly the cap per dataset
    assert dg.min_source_size([("a", "random", 1.0), ("b", "random", 2.0)]) == 3


def test_datasets(tiny_data):
    source_ids, target_id = dg.dataset_ids(tiny_data["env_id"], tiny_data["source"], tiny_data["source_size"],
                                           tiny_data["target_size"])
    entries = dg.parse_source(tiny_data["source"])
    for dataset_id, (domain, quality, *_) in zip(source_ids + [target_id], entries + [("nominal", "medium", 1)]):
        ds = minari.load_dataset(dataset_id)
        assert ds.total_steps == (tiny_data["target_size"] if domain == "nominal" else tiny_data["source_size"] // 3)
        meta = ds.storage.get_episode_metadata(range(ds.total_episodes))
        for m, ep in zip(meta, ds.iterate_episodes()):
            assert m["options"] == {"domain": domain, "quality": quality}
            ended = ep.terminations | ep.truncations
            assert ended[-1] and not ended[:-1].any()  # one episode per buffer: no transition spans two
            assert len(ep.observations) == len(ep.actions) + 1
        assert json.loads(ds.storage.metadata["v2a_generation"])["quality"] == quality
        env = ds.recover_environment(eval_env=True)
        assert env.observation_space.shape == (11,)
        # the stored spaces say what the stored arrays are: float32, identical across source and target
        assert ds.observation_space.dtype == np.float32 and ds.action_space.dtype == np.float32
        assert next(ds.iterate_episodes()).observations.dtype == np.float32
        target = minari.load_dataset(target_id)
        assert ds.observation_space == target.observation_space and ds.action_space == target.action_space
        if domain != "nominal":
            assert env.spec.kwargs["shift"] == domain and tiny_data["source"] in ds.storage.metadata["description"]
    gravity_env = minari.load_dataset(source_ids[1]).recover_environment()
    assert np.isclose(gravity_env.unwrapped.model.opt.gravity[2], -9.81 * 0.5)
    # the printed summary names every id
    for dataset_id in source_ids + [target_id]:
        assert dataset_id in tiny_data["stdout"]


def test_normalized_score_round_trip(tiny_data):
    target = minari.load_dataset(dg.dataset_ids(tiny_data["env_id"], tiny_data["source"], tiny_data["source_size"],
                                                tiny_data["target_size"])[1])
    lo, hi = target.storage.metadata["ref_min_score"], target.storage.metadata["ref_max_score"]
    assert hi > lo
    np.testing.assert_allclose(minari.get_normalized_score(target, np.array([lo, hi])), [0.0, 1.0], atol=1e-9)


def test_reuse_and_conflicts(tiny_data):
    args = tiny_data["base_args"]
    again = run_script("data_gen.py", *args)
    assert again.stdout.count("reusing") == 4
    conflict = run_script("data_gen.py", *args, "--seed", "7", check=False)
    assert conflict.returncode != 0 and "--overwrite" in conflict.stderr and "Traceback" not in conflict.stderr


# -------------------------------------------------------------------------------------------------------------
# Bad input and faults, end to end: one line on stderr, a non-zero exit, nothing written where it must not be
# -------------------------------------------------------------------------------------------------------------
TINY_ARGS = ["--env-id", TINY["env_id"], "--source", TINY["source"], "--source-size", str(TINY["source_size"]),
             "--target-size", str(TINY["target_size"]), "--ref-min-episodes", "5", "--ref-max-episodes", "2"]


def script_env(minari_path) -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", MINARI_DATASETS_PATH=str(minari_path))


def run_dg(minari_path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """data_gen.py as a user runs it, with its own MINARI_DATASETS_PATH."""
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "data_gen.py"), *args], cwd=ROOT,
                          env=script_env(minari_path), capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)
    if check and proc.returncode != 0:
        raise AssertionError(f"data_gen.py {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def start(minari_path, *args: str, out) -> subprocess.Popen:
    """data_gen.py in the background, its stdout and stderr into files `out`.stdout / `out`.stderr."""
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "data_gen.py"), *args], cwd=ROOT,
                            env=script_env(minari_path), stdout=open(f"{out}.stdout", "w"),
                            stderr=open(f"{out}.stderr", "w"), text=True)


def wait_for(condition, timeout: float = 120.0, what: str = ""):
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def staging_folders(root) -> list[str]:
    parent, base = os.path.split(str(root))
    return [n for n in os.listdir(parent) if n.startswith(f"{base}-staging-")]


def assert_tiny_datasets(root):
    source_ids, target_id = dg.dataset_ids(TINY["env_id"], TINY["source"], TINY["source_size"], TINY["target_size"])
    old = os.environ.get("MINARI_DATASETS_PATH")
    os.environ["MINARI_DATASETS_PATH"] = str(root)
    try:
        for dataset_id in source_ids + [target_id]:
            ds = minari.load_dataset(dataset_id)
            expected = TINY["target_size"] if dataset_id == target_id else TINY["source_size"] // 3
            assert ds.total_steps == expected == sum(len(ep.actions) for ep in ds.iterate_episodes()), dataset_id
    finally:  # restore: unset when it was unset (a test run alone has no tiny_data fixture to set it)
        if old is None:
            del os.environ["MINARI_DATASETS_PATH"]
        else:
            os.environ["MINARI_DATASETS_PATH"] = old


@pytest.mark.parametrize("args,message", [  # one case per class end to end; every variant in test_validate_args
    (["--env-id", "Humanoid-v4"], "supported: Hopper-v4"),
    (["--source", "gravity-0.5:expert:inf"], "malformed source entry 'gravity-0.5:expert:inf': the weight must be"),
    (["--seed", "-1"], "--seed -1"),
    (["--seed", str(2 ** 31)], "--seed 2147483648: must lie in [0, 2^31)"),
    (["--source-size", "-1"], "--source-size -1: must be a positive number of transitions"),
    (["--policy-steps", "-1"], "--policy-steps -1"),
    (["--source-size", "2"], "would get no transition"),
    (["--source-size", "100000000"], "above the cap of 10,000,000 per dataset"),
    (["--train-domain", "gravity-0.3"], "unknown shift 'gravity-0.3'"),
    # a robot without policies: every missing file with the command that trains it and how long it takes, one line
    (["--env-id", "Walker2d-v4", "--policy-dir", "/nonexistent"],
     "/nonexistent/walker2d/gravity-0.5.pt (train it: python data_gen.py --env-id Walker2d-v4 --train-domain "
     "gravity-0.5 --policy-dir /nonexistent); /nonexistent/walker2d/thighjnt-hard.pt"),
])
def test_bad_input_is_one_clear_line(args, message, tmp_path):
    root = tmp_path / "datasets"
    proc = run_dg(root, *args, check=False)
    assert proc.returncode != 0
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0
    if "Walker2d-v4" in args:
        assert "/nonexistent/walker2d/nominal.pt" in proc.stderr and "45-60 min" in proc.stderr
    assert not root.exists() and os.listdir(tmp_path) == []  # nothing written


def test_corrupt_dataset_is_named(tiny_data, tmp_path):
    root = tmp_path / "datasets"
    shutil.copytree(tiny_data["minari_path"], root)
    source_ids, target_id = dg.dataset_ids(TINY["env_id"], TINY["source"], TINY["source_size"], TINY["target_size"])
    hdf5 = root / source_ids[1] / "data" / "main_data.hdf5"
    os.truncate(hdf5, hdf5.stat().st_size // 2)
    (root / target_id / "data" / "metadata.json").unlink()
    for broken in (target_id, source_ids[1]):
        proc = run_dg(root, *TINY_ARGS, check=False)
        assert proc.returncode != 0 and "Traceback" not in proc.stderr and proc.stderr.strip().count("\n") == 0
        assert f"dataset {broken} at {root / broken}" in proc.stderr and "--overwrite" in proc.stderr
        assert "collecting" not in proc.stdout
        shutil.rmtree(root / broken)
        shutil.copytree(os.path.join(tiny_data["minari_path"], broken), root / broken)  # the target is checked first
    os.truncate(hdf5, hdf5.stat().st_size // 2)
    run_dg(root, *TINY_ARGS, "--overwrite")
    assert_tiny_datasets(root)


def test_regenerated_dataset_is_identical(tiny_data, tmp_path):
    """A dataset's data depend on the seed and its policy only, not on which other datasets already existed."""
    root = tmp_path / "datasets"
    shutil.copytree(tiny_data["minari_path"], root)
    source_ids, target_id = dg.dataset_ids(TINY["env_id"], TINY["source"], TINY["source_size"], TINY["target_size"])
    shutil.rmtree(root / source_ids[2])  # legjnt-hard:medium, collected by a SAC policy (sampled actions)
    assert run_dg(root, *TINY_ARGS).stdout.count("reusing") == 3
    episodes = []
    for path in (tiny_data["minari_path"], root):
        os.environ["MINARI_DATASETS_PATH"] = str(path)
        episodes.append(list(minari.load_dataset(source_ids[2]).iterate_episodes()))
    os.environ["MINARI_DATASETS_PATH"] = tiny_data["minari_path"]
    assert len(episodes[0]) == len(episodes[1])
    for a, b in zip(*episodes):
        assert np.array_equal(a.observations, b.observations) and np.array_equal(a.actions, b.actions)


def test_unwritable_datasets_path_fails_before_collecting(tmp_path):
    (tmp_path / "afile").write_text("a regular file, so nothing can be created below it\n")
    proc = run_dg(tmp_path / "afile" / "datasets", *TINY_ARGS, check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr and proc.stderr.strip().count("\n") == 0
    assert "cannot write datasets under" in proc.stderr and "MINARI_DATASETS_PATH" in proc.stderr
    assert "collecting" not in proc.stdout and sorted(os.listdir(tmp_path)) == ["afile"]


def test_two_writers_wait_and_reuse(tmp_path):
    """Two data_gen.py on the same datasets: each waits while the lock is held (here by the test itself), then one
    writes the datasets and the other reuses them."""
    root = tmp_path / "datasets"
    root.mkdir()
    fd = os.open(root / ".v2a-data_gen.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.write(fd, f"{os.getpid()}\n".encode())
    procs = [start(root, *TINY_ARGS, out=tmp_path / f"p{i}") for i in range(2)]
    try:
        waiting = f"waiting for another data_gen.py (pid {os.getpid()}) writing to {root}"
        wait_for(lambda: all(waiting in (tmp_path / f"p{i}.stderr").read_text() for i in range(2)), what=waiting)
    finally:
        os.close(fd)
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    outs = [(tmp_path / f"p{i}.stdout").read_text() for i in range(2)]
    assert sorted(out.count("reusing") for out in outs) == [0, 4]
    assert_tiny_datasets(root)
    assert staging_folders(root) == []


def start_until_staging(root, out):
    """A tiny generation in the background, returned once its staging folder exists (it is collecting)."""
    proc = start(root, *TINY_ARGS, out=out)
    staging = f"{root}-staging-{proc.pid}"
    wait_for(lambda: os.path.isdir(staging) or proc.poll() is not None, what=staging)
    return proc, staging


def test_killed_run_leaves_nothing_behind(tmp_path):
    root = tmp_path / "datasets"
    proc, staging = start_until_staging(root, tmp_path / "killed")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert os.path.isdir(staging)  # what a SIGKILL leaves
    rerun = run_dg(root, *TINY_ARGS)
    assert f"removed {staging}" in rerun.stdout
    assert staging_folders(root) == []
    assert_tiny_datasets(root)


def test_sigterm_removes_staging_in_process(tmp_path):
    root = tmp_path / "datasets"
    proc, _ = start_until_staging(root, tmp_path / "term")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) != 0
    assert staging_folders(root) == [] and "Traceback" not in (tmp_path / "term.stderr").read_text()


# A meta-path finder that makes the named top-level packages absent, as in a virtual environment without them
BLOCK_IMPORTS = """
import sys
class Absent:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Absent())
"""


def test_recover_environment_from_another_directory(tiny_data, tmp_path):
    """The datasets stand alone: with the project installed (`pip install -r requirements.txt` installs it with
    `-e .`), recover_environment() works from any directory, in an environment with minari, gymnasium and mujoco
    only (torch and tyro are made absent here)."""
    source_ids, _ = dg.dataset_ids(TINY["env_id"], TINY["source"], TINY["source_size"], TINY["target_size"])
    code = (f"BLOCKED = {{'torch', 'tyro'}}\n{BLOCK_IMPORTS}\n"
            "import minari; ds = minari.load_dataset(%r); env = ds.recover_environment(); env.reset(seed=0); "
            "env.step(env.action_space.sample()); assert 'torch' not in sys.modules; "
            "print(env.unwrapped.model.opt.gravity[2]); print(ds.storage.metadata['description'])" % source_ids[1])
    env = {k: v for k, v in script_env(tiny_data["minari_path"]).items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=SUBPROCESS_TIMEOUT)
    assert proc.returncode == 0, ("is the project installed (pip install -r requirements.txt)?\n" + proc.stderr)
    assert np.isclose(float(proc.stdout.split()[0]), -9.81 * 0.5)
    assert "pip install -r requirements.txt" in proc.stdout


def test_shifted_envs_need_gymnasium_and_mujoco_only(tmp_path):
    """The shifted domains through their registered entry point, with torch, tyro and minari absent."""
    code = (f"BLOCKED = {{'torch', 'tyro', 'minari'}}\n{BLOCK_IMPORTS}\n"
            "import gymnasium as gym, data_gen\n"
            "for env_id in ('V2A/ShiftedHopper-v4', 'V2A/ShiftedAnt-v5'):\n"
            "    env = gym.make(env_id, shift='gravity-0.5'); env.reset(seed=0); env.step(env.action_space.sample())\n"
            "print(sorted(m for m in sys.modules if m.partition('.')[0] in BLOCKED))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=script_env(tmp_path), capture_output=True,
                          text=True, timeout=SUBPROCESS_TIMEOUT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_pyproject_declares_what_the_envs_need():
    """`pip install -e <repository>` alone brings what recover_environment() needs, and not torch."""
    import tomllib
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        deps = [d.split("=")[0].split(">")[0].split("[")[0].strip() for d in tomllib.load(f)["project"]["dependencies"]]
    assert {"gymnasium", "mujoco", "numpy"} <= set(deps) and "torch" not in deps and "tyro" not in deps


def test_committed_policies_found_from_another_directory(tmp_path):
    """The default --policy-dir is the policies folder beside data_gen.py, whatever the working directory; a named
    mixture is accepted on the command line and names the same datasets as its entries."""
    (tmp_path / "elsewhere").mkdir()
    args = ["--source", "crossed", "--source-size", "400", "--target-size", "100", "--ref-min-episodes", "1",
            "--ref-max-episodes", "1"]
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "data_gen.py"), *args], cwd=tmp_path / "elsewhere",
                          env=script_env(tmp_path / "datasets"), capture_output=True, text=True,
                          timeout=SUBPROCESS_TIMEOUT)
    assert proc.returncode == 0, proc.stderr
    source_ids, target_id = dg.dataset_ids("Hopper-v4", mixtures.NAMED_SOURCES["Hopper"]["crossed"], 400, 100)
    for dataset_id in source_ids + [target_id]:
        assert (tmp_path / "datasets" / dataset_id / "data" / "main_data.hdf5").exists(), dataset_id
    assert os.listdir(tmp_path / "elsewhere") == []


def test_train_domain_reports_at_once(tmp_path):
    """--train-domain says what it starts at once and reports progress with an ETA before the first evaluation."""
    proc = start(tmp_path / "datasets", "--train-domain", "gravity-2.0", "--policy-steps", "300000",
                 "--policy-eval-freq", "100000", "--policy-dir", str(tmp_path / "policies"), out=tmp_path / "train")
    t0, stdout = time.time(), lambda: (tmp_path / "train.stdout").read_text()
    try:
        wait_for(lambda: "training the behaviour policies of Hopper-v4 gravity-2.0: SAC for 300,000 steps" in stdout(),
                 timeout=60, what="the start line")
        started = time.time() - t0
        wait_for(lambda: "ETA" in stdout(), timeout=150, what="a progress line with an ETA")
    finally:
        proc.kill()
        proc.wait()
    assert started < 30 and "[gravity-2.0] step " in stdout() and "warning" not in (tmp_path / "train.stderr").read_text()


# A parent that runs data_gen.py as v2a_utils.data.run_data_gen does (own session, stderr piped), and says the child's pid
PARENT = """
import subprocess, sys
child = subprocess.Popen([sys.executable, *sys.argv[1:]], stderr=subprocess.PIPE, text=True, start_new_session=True,
                         cwd=%r)
print(child.pid, flush=True)
child.communicate()
"""


def test_child_stops_when_its_parent_is_killed(tmp_path):
    root = tmp_path / "datasets"
    parent = subprocess.Popen([sys.executable, "-c", PARENT % ROOT, os.path.join(ROOT, "data_gen.py"), *TINY_ARGS[:4],
                               "--source-size", "300000", "--target-size", "100000"], env=script_env(root),
                              stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    try:
        wait_for(lambda: os.path.isdir(f"{root}-staging-{child}"), what="the child collecting")
        parent.kill()  # SIGKILL: no handler of the parent's runs
        parent.wait()
        wait_for(lambda: not processes.pid_alive(child), timeout=15, what="the orphaned data_gen.py to stop")
        assert staging_folders(root) == []  # it stopped through its SIGTERM handler, which removes the staging folder
    finally:
        if processes.pid_alive(child):
            os.kill(child, signal.SIGKILL)


def test_tie_to_parent_closes_the_race(tmp_path):
    """A parent that died before prctl took effect: the process stops at once. A parent that is not this Python (a
    shell, whose `nohup python data_gen.py &` must outlive it) is not followed."""
    code = ("import os, sys, data_gen\n"
            "print(data_gen.tie_to_parent(os.getppid(), '/bin/sh'), flush=True)\n"
            "data_gen.tie_to_parent(os.getppid() + 4_000_000, os.path.realpath(sys.executable))\n"
            "print('still running')")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=script_env(tmp_path), capture_output=True,
                          text=True, timeout=SUBPROCESS_TIMEOUT)
    assert proc.stdout.split() == ["False"] and proc.returncode == -signal.SIGTERM


def test_sac_trainer_writes_medium_and_expert(tmp_path):
    proc = run_script("data_gen.py", "--train-domain", "gravity-2.0", "--policy-steps", "1200", "--policy-eval-freq",
                      "300", "--policy-dir", str(tmp_path))
    assert proc.stdout.startswith("training the behaviour policies of Hopper-v4 gravity-2.0: SAC for 1,200 steps")
    assert "warning: --policy-steps 1,200 is below SAC's 5,000 random warm-up steps" in proc.stderr
    record = torch.load(tmp_path / "hopper" / "gravity-2.0.pt", weights_only=False)
    assert {"expert", "medium"} <= record.keys() and len(record["curve"]) == 4
    actor = dg.Actor(record["obs_dim"], record["act_dim"])
    actor.load_state_dict(record["medium"]["state_dict"])
    # the finished run keeps its training state: a larger budget extends it, a smaller one is refused
    assert (tmp_path / "hopper" / "gravity-2.0.train-state.pt").exists()
    proc = run_script("data_gen.py", "--train-domain", "gravity-2.0", "--policy-steps", "1800", "--policy-eval-freq",
                      "300", "--policy-dir", str(tmp_path))
    assert "resuming SAC from step 1200" in proc.stdout
    longer = torch.load(tmp_path / "hopper" / "gravity-2.0.pt", weights_only=False)
    assert longer["sac_steps"] == 1800 and longer["curve"][:4] == record["curve"] and len(longer["curve"]) == 6
    proc = run_script("data_gen.py", "--train-domain", "gravity-2.0", "--policy-steps", "900", "--policy-eval-freq",
                      "300", "--policy-dir", str(tmp_path), check=False)
    assert proc.returncode == 1 and "has already trained 1800 steps" in proc.stderr


def test_sac_trainer_errors_are_one_line(tmp_path):
    """v2a_utils/behaviour.py raises DataGenError: one line, no traceback, from data_gen.py's main."""
    (tmp_path / "hopper").mkdir()
    (tmp_path / "hopper" / "gravity-2.0.train-state.pt").write_text("not a checkpoint")
    proc = run_script("data_gen.py", "--train-domain", "gravity-2.0", "--policy-steps", "1200", "--policy-eval-freq",
                      "300", "--policy-dir", str(tmp_path), check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("data_gen.py: error: training state ")


def test_an_unreadable_parent_does_not_break_the_import(monkeypatch):
    """A process whose parent's /proc/<pid>/exe cannot be read (reparented to PID 1 after `nohup ... &` in a container,
    another user's parent) must still import data_gen: the shifted envs' entry point imports it. It crashed with
    PermissionError at import before."""
    def denied(path, strict=False):
        raise PermissionError(13, "Permission denied", path)

    with monkeypatch.context() as m:
        m.setattr(os.path, "realpath", denied)
        assert processes.parent_now() == (os.getppid(), "")
    assert dg.tie_to_parent(os.getppid(), "") is False  # such a parent is not followed
