"""Every robot with committed behaviour policies works end to end: tiny datasets collected by each of its committed
policies (shifted domains in the source, the nominal domain's in the target and its reference scores) and by the
random policy, their spaces and metadata, and one tiny V2A run of each training script on them."""
import glob
import json
import os

import minari
import numpy as np
import pytest
from conftest import ROOT, run_script

import data_gen as dg
from v2a_utils import mixtures

COMMITTED = {robot: sorted(os.path.basename(p)[: -len(".pt")]
                           for p in glob.glob(os.path.join(ROOT, "policies", robot.lower(), "*.pt"))
                           if not p.endswith(".train-state.pt"))  # an unfinished SAC run's state, not a policy
             for robot in dg.ROBOTS}  # robot -> the domains whose behaviour policies are committed
ROBOTS_WITH_POLICIES = [robot for robot, domains in COMMITTED.items() if "nominal" in domains]
TINY_TRAIN = ["--repr-steps", "5", "--sql-steps", "5", "--info-steps", "5", "--total-steps", "20", "--eval-freq", "20",
              "--eval-episodes", "1", "--final-eval-episodes", "1", "--log-freq", "10", "--no-compile"]


def nominal_random_reward_per_step(env_id: str, steps: int = 2000) -> float:
    env = dg.make_domain_env(env_id, "nominal")
    env.action_space.seed(0)
    env.reset(seed=0)
    rewards = []
    for _ in range(steps):
        _, r, term, trunc, _ = env.step(env.action_space.sample())
        rewards.append(r)
        if term or trunc:
            env.reset()
    return float(np.mean(rewards))


def test_every_robot_has_its_default_mixtures_policies():
    """The four robots of the paper: every domain that a default mixture collects with a policy, and the nominal one
    (target data, reference scores), has a committed policy file."""
    for robot in dg.ROBOTS:
        needed = {"nominal"} | {d for d, q, *_ in dg.parse_source(mixtures.DEFAULT_SOURCES[robot]) if q != "random"}
        assert needed <= set(COMMITTED[robot]), (robot, needed - set(COMMITTED[robot]))


@pytest.mark.parametrize("robot", ROBOTS_WITH_POLICIES)
def test_committed_policies_collect_and_train(robot, tmp_path, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))
    env_id, random_domain = f"{robot}-v4", dg.parse_source(mixtures.DEFAULT_SOURCES[robot])[0][0]
    shifted = [d for d in COMMITTED[robot] if d != "nominal"]  # nominal's policies make the target and reference scores
    entries = [f"{random_domain}:random"] + [f"{d}:{q}" for d in shifted for q in ("medium", "expert")]
    source, per_entry = ",".join(entries), 400
    sizes = ["--source-size", str(per_entry * len(entries)), "--target-size", "400"]
    run_script("data_gen.py", "--env-id", env_id, "--source", source, *sizes, "--ref-min-episodes", "2",
               "--ref-max-episodes", "1")
    src_ids, tgt_id = dg.dataset_ids(env_id, source, per_entry * len(entries), 400)
    obs_dim, act_dim = dg.DIMS[robot]
    reward_per_step = {}
    for ds_id, (domain, quality, *_) in zip(src_ids, dg.parse_source(source)):
        ds = minari.load_dataset(ds_id)
        assert ds.total_steps == per_entry and ds.observation_space.shape == (obs_dim,)
        assert ds.action_space.shape == (act_dim,)
        assert json.loads(ds.storage.metadata["v2a_generation"])["domain"] == domain
        reward_per_step[domain, quality] = np.mean(np.concatenate([ep.rewards for ep in ds.iterate_episodes()]))
    target = minari.load_dataset(tgt_id)
    reward_per_step["nominal", "medium"] = np.mean(np.concatenate([ep.rewards for ep in target.iterate_episodes()]))
    # A trained policy earns more per step than the uniform random policy in the nominal env. (Not than the random
    # source: its domain is chosen because it inflates the random return, and 400 steps of a medium policy that
    # falls early in its first episode can earn less per step than that.)
    random_per_step = nominal_random_reward_per_step(env_id)
    for (domain, quality), per_step in reward_per_step.items():
        assert quality == "random" or per_step > random_per_step + 0.1, (domain, quality, per_step, random_per_step)
    # the nominal expert (ref_max_score) beats the random policy (ref_min_score)
    assert target.storage.metadata["ref_max_score"] > target.storage.metadata["ref_min_score"] + 100
    for script in ("v2a_iql.py", "v2a_td3bc.py"):
        out = run_script(script, "--env-id", env_id, "--source", source, *sizes, "--no-generate", *TINY_TRAIN,
                         cwd=str(tmp_path))
        assert "final score (the 1-episode evaluation of the last policy)" in out.stdout
        run_dir = out.stdout.split("done: ")[1].split()[0]
        with open(os.path.join(tmp_path, run_dir, "results.json")) as fh:
            assert np.isfinite(json.load(fh)["final_normalized_score"])
