"""What a dataset carries besides its arrays (v2a_utils/data_truth.py): the true dynamics gap of every row, stored with the
dataset and loaded aligned with the source rows; the fingerprint of its arrays and the machine that made it, checked
when a training script loads it; datasets made before either keep working."""
import json
import os
import shutil
import subprocess
import sys

import h5py
import minari
import numpy as np
import pytest
import torch
from conftest import ROOT, SUBPROCESS_TIMEOUT, run_script

import data_gen as dg
import v2a_iql
import v2a_utils
from v2a_utils import data_truth, runs, shifts


def gaps_of(path, dataset_id):
    old = os.environ.get("MINARI_DATASETS_PATH")
    os.environ["MINARI_DATASETS_PATH"] = str(path)
    try:
        return data_truth.read_gaps(dataset_id)
    finally:
        os.environ["MINARI_DATASETS_PATH"] = old


def ids(tiny_data):
    return dg.dataset_ids(tiny_data["env_id"], tiny_data["source"], tiny_data["source_size"], tiny_data["target_size"])


def test_gap_of_each_domain(tiny_data):
    """The target's rows are 0 (not stepped again: test_gap_probe_every_robot checks that they would be). Half gravity
    is off by about the vertical velocity half of g adds in one 0.008 s step (0.039) on every row; the restricted knee
    only where its limit binds, so most legjnt-hard rows are exactly 0; the longer torso everywhere."""
    torso, gravity, legjnt = [gaps_of(tiny_data["minari_path"], i) for i in ids(tiny_data)[0]]
    target = gaps_of(tiny_data["minari_path"], ids(tiny_data)[1])
    assert len(target) == tiny_data["target_size"] and (target == 0).all()
    assert len(gravity) == len(legjnt) == len(torso) == tiny_data["source_size"] // 3
    assert (gravity > 0).all() and abs(np.median(gravity) - 0.5 * 9.81 * 0.008) < 2e-3
    assert 0.03 < np.quantile(gravity, 0.1) and np.quantile(gravity, 0.9) < 0.045  # constant, but where a contact acts
    assert (legjnt == 0).mean() > 0.8 and legjnt.max() > 0.01
    assert (torso > 0).all() and torso.mean() > 0.2


@pytest.mark.parametrize("env_id", shifts.SUPPORTED_ENV_IDS)
def test_gap_probe_every_robot(env_id):
    """Every robot, v4 and v5 (Ant-v5 without its contact forces, as the datasets have it): the nominal env stepped from
    a nominal row's own state reproduces it bit for bit (gap exactly 0), a gravity domain's rows never; the gap sits in
    the episodes' infos."""
    gaps = {}
    for domain in ("nominal", "gravity-0.5"):
        env = dg.make_domain_env(env_id, domain)
        probe = data_truth.GapProbe(env, dg.make_domain_env(env_id, "nominal"))
        buffers = dg.collect(env, None, 60, seed=3, options={}, probe=probe)
        gaps[domain] = np.concatenate([b.infos[data_truth.GAP_KEY] for b in buffers])
        assert len(gaps[domain]) == 60 and gaps[domain].dtype == np.float32
    assert (gaps["nominal"] == 0).all() and (gaps["gravity-0.5"] > 0).all()


@pytest.mark.parametrize("robot,domain", [("Hopper", "gravity-0.5"), ("Ant", "alllegs-hard")])
def test_actor_act_is_forward_bit_for_bit(robot, domain):
    """data_gen.py acts with Actor.act (no log-probability, no nn.Module calls: it pays for the gap's extra physics);
    its actions must be forward()'s to the bit, sampled and deterministic, so the data are those of the older code."""
    for quality in ("medium", "expert"):
        actor, _ = dg.load_actor(dg.Args(), robot, domain, quality)
        obs = np.random.default_rng(0).normal(size=(200, dg.DIMS[robot][0]))
        for deterministic in (False, True):
            with torch.no_grad():
                torch.manual_seed(0)
                full = [actor(torch.as_tensor(o, dtype=torch.float32)[None], deterministic)[0][0].numpy() for o in obs]
                torch.manual_seed(0)
                fast = [actor.act(o, deterministic) for o in obs]
            assert all(np.array_equal(a, b) for a, b in zip(full, fast))


# ---- loading: the gap aligned with the source rows; fingerprints and machines recorded and checked ------------------
def load(tiny_data, path=None):
    args = v2a_iql.Args(env_id=tiny_data["env_id"], source=tiny_data["source"], source_size=tiny_data["source_size"],
                        target_size=tiny_data["target_size"], generate=False)
    old = os.environ["MINARI_DATASETS_PATH"]
    os.environ["MINARI_DATASETS_PATH"] = str(path or tiny_data["minari_path"])
    try:
        return v2a_utils.load_data(args, torch.device("cpu")), args
    finally:
        os.environ["MINARI_DATASETS_PATH"] = old


def test_loaded_gap_and_records(tiny_data):
    d, args = load(tiny_data)
    src_ids, tgt_id = ids(tiny_data)
    expected = np.concatenate([gaps_of(tiny_data["minari_path"], i) for i in src_ids])
    assert d["true_gap"].dtype == torch.float32 and d["true_gap"].shape == (d["n_src"],)
    np.testing.assert_array_equal(d["true_gap"].numpy(), expected.astype(np.float32))
    # aligned with the rows: each row's domain (through its trajectory) has that domain's gap
    gap, dom = d["true_gap"].numpy(), np.array(d["dom_names"])[d["dom"][d["traj_id"]].numpy()]
    assert abs(np.median(gap[dom == "gravity-0.5"]) - 0.039) < 2e-3 and (gap[dom == "torso-hard"] > 0).all()
    assert (gap[dom == "legjnt-hard"] == 0).mean() > 0.8
    for ds_id in src_ids + [tgt_id]:
        record = d["records"][ds_id]
        content = data_truth.fingerprint(minari_episodes(tiny_data["minari_path"], ds_id))
        assert record["fingerprint"] == content and len(content) == 16
        assert {"cpu", "os", "python", "numpy", "mujoco", "torch"} <= set(record["machine"])
        assert record["env_id"] == tiny_data["env_id"]  # the generation record as before
    assert "data_gen.py --env-id Hopper-v4" in d["true_gap_hint"] and "--overwrite" in d["true_gap_hint"]


def minari_episodes(path, dataset_id):
    old = os.environ["MINARI_DATASETS_PATH"]
    os.environ["MINARI_DATASETS_PATH"] = str(path)
    try:
        return list(minari.load_dataset(dataset_id).iterate_episodes())
    finally:
        os.environ["MINARI_DATASETS_PATH"] = old


def make_old(path, dataset_id):
    """The dataset as data_gen.py wrote it before this change: no gap in the infos, no fingerprint, no machine."""
    with h5py.File(os.path.join(path, dataset_id, "data", "main_data.hdf5"), "r+") as f:
        for name in list(f):
            if "infos" in f[name]:
                del f[name]["infos"]
    meta_path = os.path.join(path, dataset_id, "data", "metadata.json")
    meta = json.load(open(meta_path))
    json.dump({k: v for k, v in meta.items() if k not in ("v2a_fingerprint", "v2a_machine")}, open(meta_path, "w"))


def test_datasets_made_before_load_as_before(tiny_data, tmp_path):
    """Old datasets train as before: no gap (None, and a one-line hint naming them and the regenerate command), no
    fingerprint or machine (None), and the stage keys of their checkpoints unchanged."""
    path = shutil.copytree(tiny_data["minari_path"], tmp_path / "minari")
    src_ids, tgt_id = ids(tiny_data)
    for ds_id in (src_ids[1], tgt_id):
        make_old(path, ds_id)
    d, args = load(tiny_data, path)
    assert d["true_gap"] is None and "\n" not in d["true_gap_hint"]
    assert src_ids[1] in d["true_gap_hint"] and src_ids[0] not in d["true_gap_hint"]
    assert "python data_gen.py --env-id Hopper-v4" in d["true_gap_hint"] and "--overwrite" in d["true_gap_hint"]
    assert d["records"][tgt_id]["fingerprint"] is None and d["records"][tgt_id]["machine"] is None
    new, _ = load(tiny_data)
    np.testing.assert_array_equal(d["data"].numpy(), new["data"].numpy())
    # a checkpoint's key made before records carried fingerprint and machine equals the key of an old dataset now
    keys = lambda records: runs.stage_keys(args, records, (1, 2, 3, 4), "v2a_iql.py", v2a_iql.STAGE_CONSTANTS)
    before = {i: {k: v for k, v in r.items() if k not in ("fingerprint", "machine")} for i, r in d["records"].items()}
    old_key = keys(before)
    assert keys(d["records"])[1] != old_key[1]  # the sources that have a fingerprint key with it
    assert keys({i: dict(r, fingerprint=None, machine=None) for i, r in before.items()}) == old_key


def test_changed_dataset_is_one_line(tiny_data, tmp_path):
    """One changed action: loading names the dataset and both fingerprints, in one line."""
    path = shutil.copytree(tiny_data["minari_path"], tmp_path / "minari")
    ds_id = ids(tiny_data)[0][2]
    with h5py.File(os.path.join(path, ds_id, "data", "main_data.hdf5"), "r+") as f:
        f["episode_1"]["actions"][3, 0] += 0.125
    stored = json.load(open(os.path.join(path, ds_id, "data", "metadata.json")))["v2a_fingerprint"]
    with pytest.raises(SystemExit) as e:
        load(tiny_data, path)
    msg = str(e.value)
    content = data_truth.fingerprint(minari_episodes(path, ds_id))
    assert "\n" not in msg and f"dataset {ds_id} does not match its fingerprint" in msg
    assert stored in msg and content in msg and content != stored and "--overwrite" in msg


def test_gap_figure(tiny_data, tmp_path):
    """--gap-figure reuses the datasets, prints each source dataset's gap and draws them; an old dataset is one line."""
    figure = tmp_path / "gap.png"
    out = run_script("data_gen.py", *tiny_data["base_args"], "--gap-figure", str(figure)).stdout
    assert out.count("reusing") == 4 and figure.stat().st_size > 10_000
    assert "true gap of gravity-0.5:expert: 1000 rows, mean 0.03" in out and "exactly 0 in 0.0 %" in out
    path = shutil.copytree(tiny_data["minari_path"], tmp_path / "minari")
    make_old(path, ids(tiny_data)[0][0])
    env = dict(os.environ, MINARI_DATASETS_PATH=str(path), PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "data_gen.py"), *tiny_data["base_args"], "--gap-figure",
                           str(tmp_path / "old.png")], env=env, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)
    assert proc.returncode != 0 and proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    assert "holds no true dynamics gap" in proc.stderr and "--overwrite" in proc.stderr
    assert not (tmp_path / "old.png").exists()
