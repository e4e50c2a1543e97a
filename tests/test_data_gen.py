"""data_gen.py: shifted domains, behaviour-policy files, and the Minari datasets it writes."""
import json

import minari
import numpy as np
import pytest
import torch

import data_gen as dg
from conftest import run_script


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


@pytest.mark.parametrize("env_id", dg.SUPPORTED_ENV_IDS)
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
    assert dg._scale_joint_range(-150, 0, 0.2) == (-30, 0)            # ODRL Hopper leg, hard
    assert dg._scale_joint_range(-45, 45, 0.8) == (-36, 36)            # ODRL Hopper foot, easy
    assert dg._scale_joint_range(30, 70, 0.5) == (30, 50)              # Ant ankle: keep the inner bound
    assert dg._scale_joint_range(-70, -30, 0.5) == (-50, -30)


def test_parse_source():
    assert dg.parse_source("torso-hard:random, gravity-0.5:medium:2") == [("torso-hard", "random", 1.0),
                                                                          ("gravity-0.5", "medium", 2.0)]
    for bad in ["torso-hard", "torso-hard:good", "a:random:-1", "a:random:x", ""]:
        with pytest.raises(dg.DataGenError):
            dg.parse_source(bad)
    src, tgt = dg.dataset_ids("Hopper-v4", "gravity-0.5:random,torso-hard:expert", 1_000_000, 5000)
    assert src == ["v2a/hopper-v4/source/gravity0p5-random-500k-v0", "v2a/hopper-v4/source/torsohard-expert-500k-v0"]
    assert tgt == "v2a/hopper-v4/target/medium-5000-v0"


def test_datasets(tiny_data):
    source_ids, target_id = dg.dataset_ids(tiny_data["env_id"], tiny_data["source"], tiny_data["source_size"],
                                           tiny_data["target_size"])
    entries = dg.parse_source(tiny_data["source"])
    for dataset_id, (domain, quality, _) in zip(source_ids + [target_id], entries + [("nominal", "medium", 1)]):
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


@pytest.mark.parametrize("args,message", [
    (["--env-id", "Humanoid-v4"], "supported: Hopper-v4"),
    (["--source", "gravity-0.3:random"], "known: nominal, gravity-0.1"),
    (["--source", "torso-hard;random"], "malformed source entry"),
    (["--source", "torso-hard:medium", "--policy-dir", "/nonexistent"], "--train-domain nominal"),
])
def test_bad_input_is_one_clear_line(args, message, tmp_path, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))
    proc = run_script("data_gen.py", *args, check=False)
    assert proc.returncode != 0
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0


def test_sac_trainer_writes_medium_and_expert(tmp_path):
    run_script("data_gen.py", "--train-domain", "gravity-2.0", "--policy-steps", "1200", "--policy-eval-freq", "300",
               "--policy-dir", str(tmp_path))
    record = torch.load(tmp_path / "hopper" / "gravity-2.0.pt", weights_only=False)
    assert {"expert", "medium"} <= record.keys() and len(record["curve"]) == 4
    actor = dg.Actor(record["obs_dim"], record["act_dim"])
    actor.load_state_dict(record["medium"]["state_dict"])
