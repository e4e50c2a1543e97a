"""Mixture entries collected by another domain's behaviour policy (`domain:quality@policy_domain`, docs/data_gen.md,
"Another domain's policy"): the grammar and its one-line errors, ids and records that stay byte-identical without `@`,
and a tiny `friction-0.5:medium@nominal` dataset: its id, record, episodes, true gap, and a trainer reading it."""
import json
import os
import subprocess
import sys

import minari
import numpy as np
import pytest
import torch
from conftest import ROOT, SUBPROCESS_TIMEOUT, run_script
from test_v2a import TINY_BUDGETS

import data_gen as dg
from v2a_utils import behaviour, flags, mixtures

MIXTURE = "friction-0.5:medium@nominal,legjnt-hard:medium"  # friction-0.5 has no policy of its own
SIZES = dict(source_size=2000, target_size=1000)
SIZE_ARGS = ["--source-size", str(SIZES["source_size"]), "--target-size", str(SIZES["target_size"])]
BY_NOMINAL = "v2a/hopper-v4/source/friction0p5-medium-by-nominal-1k-v0"


def script_env(minari_path) -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", MINARI_DATASETS_PATH=str(minari_path))


def run_dg(minari_path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, os.path.join(ROOT, "data_gen.py"), *args], cwd=ROOT, env=script_env(minari_path),
                          capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)


@pytest.fixture(scope="module")
def by_nominal(tmp_path_factory):
    """The tiny mixture, generated in a folder of its own (the session's MINARI_DATASETS_PATH is left alone)."""
    path = tmp_path_factory.mktemp("minari-by-nominal")
    proc = run_dg(path, "--source", MIXTURE, *SIZE_ARGS, "--ref-min-episodes", "2", "--ref-max-episodes", "1")
    assert proc.returncode == 0, proc.stderr
    return dict(path=path, stdout=proc.stdout)


# ---- the grammar ---------------------------------------------------------------------------------------------------
def test_parse_with_and_without_at():
    e, own, weighted = dg.parse_source("friction-0.5:expert@nominal, friction-0.5:expert, legjnt-easy:medium@legjnt-hard:2")
    assert e == ("friction-0.5", "expert", 1.0, "nominal") and e.foreign
    assert own == ("friction-0.5", "expert", 1.0, "friction-0.5") and not own.foreign  # without @: its own domain's
    assert weighted == ("legjnt-easy", "medium", 2.0, "legjnt-hard")
    assert [mixtures.entry_label(*x) for x in (e, own, weighted)] == [
        "friction-0.5:expert@nominal", "friction-0.5:expert", "legjnt-easy:medium@legjnt-hard:2"]
    # naming the entry's own domain is the entry without @: the same dataset
    assert not dg.parse_source("gravity-0.5:expert@gravity-0.5")[0].foreign
    assert (dg.dataset_ids("Hopper-v4", "gravity-0.5:expert@gravity-0.5", 1000, 10)
            == dg.dataset_ids("Hopper-v4", "gravity-0.5:expert", 1000, 10))


@pytest.mark.parametrize("spec,message", [
    ("friction-0.5:random@nominal", "malformed source entry 'friction-0.5:random@nominal': a random policy has no domain"),
    ("friction-0.5:expert@", "malformed source entry 'friction-0.5:expert@': expected domain:quality[@policy_domain]"),
    ("friction-0.5:expert@nominal:0", "the weight must be a finite number > 0"),
    ("friction-0.5:good@nominal", "malformed source entry"),
])
def test_malformed_at_entries_are_one_line(spec, message):
    with pytest.raises(dg.DataGenError) as e:
        dg.parse_source(spec)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_unknown_policy_domain_is_one_line():
    args = dg.Args(source="friction-0.5:expert@moon")
    with pytest.raises(dg.DataGenError) as e:
        dg.validate_args(args, "Hopper")
    assert str(e.value).startswith("source entry 'friction-0.5:expert@moon': unknown policy domain 'moon' after '@'")
    assert "known: nominal, gravity-0.1" in str(e.value) and "\n" not in str(e.value)
    dg.validate_args(dg.Args(source="friction-0.5:expert@nominal,legjnt-easy:medium@legjnt-hard"), "Hopper")


@pytest.mark.parametrize("measure", [False, True])
def test_missing_policy_is_one_line_naming_the_file(measure, tmp_path):
    """A policy file that is not there, named by @ or by the entry's own domain: one line naming it, the command that
    trains it and the nominal stand-in; nothing written."""
    extra = ["--measure-episodes", "1"] if measure else []
    proc = run_dg(tmp_path / "m", "--source", "legjnt-easy:medium@footjnt-hard,friction-0.5:expert", "--source-size",
                  "2000", *extra)
    err = proc.stderr.strip()
    assert proc.returncode != 0 and "\n" not in err and "Traceback" not in err
    for domain, stand_in in (("footjnt-hard", "legjnt-easy:medium@nominal"), ("friction-0.5", "friction-0.5:expert@nominal")):
        assert os.path.join("policies", "hopper", f"{domain}.pt") in err and f"--train-domain {domain}" in err
        assert stand_in in err
    assert not os.path.exists(tmp_path / "m" / "v2a")


def test_trainers_read_the_grammar():
    assert flags.parse_source("friction-0.5:expert@nominal") == dg.parse_source("friction-0.5:expert@nominal")


# ---- ids and records: unchanged without @, their own with it -------------------------------------------------------
def old_ids(env_id, source, source_size, target_size):
    """The ids as data_gen.py named them before `@` existed."""
    entries = [x.strip().split(":") for x in source.split(",")]
    total = sum(float(e[2]) if len(e) == 3 else 1.0 for e in entries)
    tag = lambda n: f"{n // 1000}k" if n % 1000 == 0 else str(n)
    ns = f"v2a/{env_id.lower()}"
    return ([f"{ns}/source/{e[0].replace('.', 'p').replace('-', '')}-{e[1]}-"
             f"{tag(int(source_size * (float(e[2]) if len(e) == 3 else 1.0) / total))}-v0" for e in entries],
            f"{ns}/target/medium-{tag(target_size)}-v0")


MIXTURES = [(f"{robot}-v4", source, 1_000_000, 100_000) for robot, source in mixtures.DEFAULT_SOURCES.items()] + [
    ("Hopper-v5", mixtures.DEFAULT_SOURCES["Hopper"], 200_000, 5000),
    ("Hopper-v4", mixtures.NAMED_SOURCES["Hopper"]["crossed"], 1_000_000, 5000),
    ("Hopper-v4", "torso-hard:random:2,gravity-0.5:expert:0.5", 300_000, 30_500)]


@pytest.mark.parametrize("env_id,source,source_size,target_size", MIXTURES)
def test_ids_and_records_without_at_are_unchanged(env_id, source, source_size, target_size):
    src, tgt = dg.dataset_ids(env_id, source, source_size, target_size)
    assert (src, tgt) == old_ids(env_id, source, source_size, target_size)
    args = dg.Args(env_id=env_id, source=source, source_size=source_size, target_size=target_size, seed=3)
    jobs = [(tgt, dg.TARGET, target_size), *zip(src, dg.parse_source(source), mixtures.entry_sizes(
        dg.parse_source(source), source_size))]
    for ds_id, entry, n in jobs:
        domain, quality = entry.domain, entry.quality
        old = {"env_id": env_id, "domain": domain, "quality": quality, "transitions": n, "seed": 3,
               "mixture": source if domain != "nominal" else None}  # the record as generate() wrote it
        assert json.dumps(dg.generation_record(args, entry, n)) == json.dumps(old)
    trainer = flags.expected_generation(dg.Args(env_id=env_id, source=source, source_size=source_size,
                                                target_size=target_size))
    assert all("policy_domain" not in rec for rec in trainer.values()) and list(trainer) == [*src, tgt]


def test_crossed_ids_literally():
    assert dg.dataset_ids("Hopper-v4", dg.resolve_source("Hopper-v4", "crossed"), 1_000_000, 5000) == (
        ["v2a/hopper-v4/source/gravity0p5-medium-250k-v0", "v2a/hopper-v4/source/gravity0p5-expert-250k-v0",
         "v2a/hopper-v4/source/legjnthard-medium-250k-v0", "v2a/hopper-v4/source/legjnthard-expert-250k-v0"],
        "v2a/hopper-v4/target/medium-5k-v0")


def test_ids_and_records_with_at():
    source = "friction-0.5:expert@nominal,friction-0.5:expert,legjnt-easy:medium@legjnt-hard:2"
    src, _ = dg.dataset_ids("Hopper-v4", source, 1_000_000, 5000)
    assert src == ["v2a/hopper-v4/source/friction0p5-expert-by-nominal-250k-v0",
                   "v2a/hopper-v4/source/friction0p5-expert-250k-v0",
                   "v2a/hopper-v4/source/legjnteasy-medium-by-legjnthard-500k-v0"]
    args = dg.Args(source=source)
    records = [dg.generation_record(args, e, 1) for e in dg.parse_source(source)]
    assert [r.get("policy_domain") for r in records] == ["nominal", None, "legjnt-hard"]
    assert all(r["domain"] in ("friction-0.5", "legjnt-easy") for r in records)  # the entry's own domain
    expected = flags.expected_generation(dg.Args(source=source, source_size=1_000_000, target_size=5000))
    assert [expected[i].get("policy_domain") for i in src] == ["nominal", None, "legjnt-hard"]


# ---- a tiny dataset collected by the nominal policy in friction-0.5 -------------------------------------------------
def test_dataset_names_the_policy(by_nominal, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(by_nominal["path"]))
    assert BY_NOMINAL in by_nominal["stdout"] and "friction-0.5:medium@nominal" in by_nominal["stdout"]
    ds = minari.load_dataset(BY_NOMINAL)
    record = json.loads(ds.storage.metadata["v2a_generation"])
    assert record == {"env_id": "Hopper-v4", "domain": "friction-0.5", "quality": "medium", "transitions": 1000,
                      "seed": 0, "mixture": MIXTURE, "policy_domain": "nominal"}
    assert "medium SAC policy of the nominal domain" in ds.storage.metadata["description"]
    for meta in ds.storage.get_episode_metadata(range(ds.total_episodes)):
        assert meta["options"] == {"domain": "friction-0.5", "quality": "medium", "policy_domain": "nominal"}
    # the env is the entry's domain, and its rows carry their true gap to the nominal dynamics
    assert ds.recover_environment().spec.kwargs["shift"] == "friction-0.5"
    gap = np.concatenate([ep.infos["true_gap"] for ep in ds.iterate_episodes()])
    assert len(gap) == ds.total_steps and (gap >= 0).all() and gap.max() > 1e-3  # friction acts where the foot touches
    own = minari.load_dataset("v2a/hopper-v4/source/legjnthard-medium-1k-v0")  # no @: as before
    assert list(own.storage.get_episode_metadata([0]))[0]["options"] == {"domain": "legjnt-hard", "quality": "medium"}
    assert "policy_domain" not in json.loads(own.storage.metadata["v2a_generation"])


def test_the_nominal_policy_collected_it(by_nominal, monkeypatch):
    """Collected again with the nominal medium actor (the dataset's seed: job 1), the first episode comes out bit for
    bit; with friction-0.5 stepped by legjnt-hard's medium actor, or the nominal actor in the nominal env, it does not."""
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(by_nominal["path"]))
    first = next(minari.load_dataset(BY_NOMINAL).iterate_episodes())
    args = dg.Args(source=MIXTURE)

    def first_episode(domain, policy):
        actor, _ = dg.load_actor(args, "Hopper", policy, "medium")
        (buf, *_) = dg.collect(dg.make_domain_env("Hopper-v4", domain), actor, len(first.actions), seed=1_000_000,
                               options={})
        return buf

    again = first_episode("friction-0.5", "nominal")
    np.testing.assert_array_equal(again.observations, first.observations)
    np.testing.assert_array_equal(again.actions, first.actions)
    for domain, policy in (("friction-0.5", "legjnt-hard"), ("nominal", "nominal")):
        other = first_episode(domain, policy)
        n = min(len(other.actions), len(first.actions))
        assert not np.array_equal(other.observations[:n + 1], first.observations[:n + 1]), (domain, policy)


def test_trainer_reads_it(by_nominal, tmp_path):
    """A filter-only run on the mixture: the rows' domain labels are the entries' domains (the diagnostics report
    friction-0.5), its args.json records the policy's domain, and the gap is there for the filter's truth."""
    env = script_env(by_nominal["path"])
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "v2a_iql.py"), "--source", MIXTURE, *SIZE_ARGS,
                           "--no-generate", *TINY_BUDGETS, "--variant", "dvdf", "--filter-only"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)
    assert proc.returncode == 0, proc.stderr
    (run_dir,) = (tmp_path / "runs").iterdir()
    acc = json.load(open(run_dir / "results.json"))["filter_accuracy"]
    assert acc["gap_mean/friction-0.5"] > 0 and "gap_mean/nominal" not in acc
    datasets = json.load(open(run_dir / "args.json"))["datasets"]
    assert datasets[BY_NOMINAL]["policy_domain"] == "nominal" and datasets[BY_NOMINAL]["domain"] == "friction-0.5"


def test_load_data_labels(by_nominal, monkeypatch):
    import v2a_iql
    from v2a_utils.data import load_data
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(by_nominal["path"]))
    d = load_data(v2a_iql.Args(source=MIXTURE, generate=False, **SIZES), torch.device("cpu"))
    assert d["dom_names"] == ["friction-0.5", "legjnt-hard"] and d["qual_names"] == ["medium"]
    assert d["true_gap"] is not None and len(d["true_gap"]) == d["n_src"] == SIZES["source_size"]


def test_measure_uses_the_named_policy(capsys):
    """--measure-episodes: the nominal medium actor in friction-0.5, on the reset seeds measure() uses."""
    args = dg.Args(source="friction-0.5:medium@nominal", measure_episodes=1, ref_min_episodes=1, ref_max_episodes=1)
    (row,) = behaviour.measure(args, "Hopper")
    assert (row["domain"], row["quality"], row["policy"]) == ("friction-0.5", "medium", "nominal")
    actor, _ = dg.load_actor(args, "Hopper", "nominal", "medium")
    expected = behaviour.evaluate_policy(dg.make_domain_env("Hopper-v4", "friction-0.5"), actor, 1, seed=20_000)
    np.testing.assert_array_equal(row["deterministic"], expected)
    assert "friction-0.5:medium@nominal" in capsys.readouterr().out


def test_data_gen_help_names_the_grammar():
    out = run_script("data_gen.py", "--help").stdout
    assert "@policy_domain" in out and "friction-0.5:expert@nominal" in out
