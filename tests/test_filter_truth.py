"""The filter's accuracy against ground truth (v2a_utils/filter_truth.py) on hand-made scores with known answers, the oracle
scores, and the --oracle / --filter-only flags of both scripts."""
import json
import os
import shutil
import sys

import pytest
import torch
from test_v2a import SCRIPTS, TINY_BUDGETS, run

from v2a_utils import filter_truth as truth


# ---- the rank statistics --------------------------------------------------------------------------------------------
def test_average_ranks_share_ties():
    assert truth.average_ranks(torch.tensor([3.0, 1.0, 3.0, 2.0])).tolist() == [3.5, 1.0, 3.5, 2.0]


def test_spearman_by_hand():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    assert truth.spearman(x, x**3) == pytest.approx(1.0)  # any increasing function: 1
    assert truth.spearman(x, -x) == pytest.approx(-1.0)
    # ranks (1,2,3,4,5) against (2,1,4,3,5): 1 - 6 sum d^2 / (n (n^2 - 1)) = 1 - 6 * 4 / 120 = 0.8
    assert truth.spearman(x, torch.tensor([2.0, 1.0, 4.0, 3.0, 5.0])) == pytest.approx(0.8)
    assert truth.spearman(x, torch.zeros(5)) is None  # a constant side: undefined, not 0


def test_auc_by_hand():
    assert truth.auc(torch.tensor([3.0, 4.0]), torch.tensor([1.0, 2.0])) == 1.0
    assert truth.auc(torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0])) == 0.0
    # pairs (2 vs 1) yes, (2 vs 3) no, (2 vs 2) half, (5 vs each) yes x3: (1 + 0 + 0.5 + 3) / 6
    assert truth.auc(torch.tensor([2.0, 5.0]), torch.tensor([1.0, 3.0, 2.0])) == pytest.approx(4.5 / 6)
    assert truth.auc(torch.tensor([1.0]), torch.tensor([])) is None


# ---- the metrics on hand-made scores ------------------------------------------------------------------------------
def test_value_metrics_separate_within_from_across_domains():
    """A that orders the qualities perfectly within each domain, but with domain 1's medium rows above domain 0's
    expert rows: nothing misordered within a domain, half of the cross-domain pairs misordered (4 cross pairs of
    groups of equal size: d0-expert vs d1-medium wrong, d1-expert vs d0-medium right)."""
    dom = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    qual = torch.tensor([1, 1, 2, 2, 1, 1, 2, 2])  # medium, expert
    adv = torch.tensor([0.0, 0.1, 1.0, 1.1, 2.0, 2.1, 3.0, 3.1])
    m = truth.value_metrics(adv, dom, qual, ["a", "b"])
    assert m["value_auc/a/expert_over_medium"] == m["value_auc/b/expert_over_medium"] == 1.0
    assert "value_auc/a/medium_over_random" not in m  # no random rows
    assert m["value_misassign_within"] == 0.0 and m["value_misassign_cross"] == pytest.approx(0.5)
    pooled = truth.value_metrics(torch.tensor([0.0, 0.1, 1.0, 1.1, 0.0, 0.1, 1.0, 1.1]), dom, qual, ["a", "b"])
    assert pooled["value_misassign_cross"] == 0.0  # the same scale in both domains: nothing misassigned


def test_dynamics_metrics_and_domain_order():
    gap = torch.tensor([0.0, 0.0, 0.5, 0.04, 0.04, 0.05])
    dom = torch.tensor([0, 0, 0, 1, 1, 1])
    m = truth.dynamics_metrics(-gap, gap, dom, ["legjnt", "gravity"])
    assert m["dyn_spearman"] == pytest.approx(1.0) and m["dyn_spearman/gravity"] == pytest.approx(1.0)
    assert m["gap_mean/legjnt"] == pytest.approx(0.5 / 3) and m["dyn_domain_order"] == 1.0
    # gravity's mean gap is the smaller here (0.043 < 0.167): an h that scores legjnt higher orders them wrong
    flipped = truth.dynamics_metrics(torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0]), gap, dom, ["legjnt", "gravity"])
    assert flipped["dyn_domain_order"] == 0.0 and flipped["h_mean/legjnt"] == 1.0


def test_gap_score_ranks_closest_dynamics_highest():
    h = truth.gap_score(torch.tensor([0.0, 0.0, 0.039, 0.041, 2.0]))
    assert h[0] == h[1] and h[1] > h[2] > h[3] > h[4] and h[4] == -1.0 and h.max() <= 1.0


def fake_truth_data(n=4000, seed=0):
    """Two domains x two qualities: 'exact' rows have the target's dynamics on 3 of 4 rows (gap 0, else 1.0), 'shifted'
    rows are all off by 0.04, as gravity-0.5's."""
    g = torch.Generator().manual_seed(seed)
    traj_len = torch.full((n // 10,), 10)
    dom, qual = torch.randint(2, (n // 10,), generator=g), torch.randint(2, (n // 10,), generator=g)
    traj_id = torch.repeat_interleave(torch.arange(n // 10), traj_len)
    rows_dom = dom[traj_id]
    gap = torch.where(rows_dom == 0, (torch.rand(n, generator=g) < 0.25).float(), torch.full((n,), 0.04))
    return dict(n_src=n, traj_id=traj_id, dom=dom, qual=qual, dom_names=["exact", "shifted"],
                qual_names=["expert", "medium"], true_gap=gap, data=torch.zeros(n, 1))


def keep_top(xi_keep: int, tradeoff: float):
    def keep(idx, h, adv, is_oracle):
        hb, ab = h[idx], adv[idx]
        lo, hi = ab.min(-1, keepdim=True).values, ab.max(-1, keepdim=True).values
        ab = (ab - lo) / (hi - lo + 1e-8)
        return torch.topk(tradeoff * hb + (1 - tradeoff) * ab, xi_keep, dim=-1).indices
    return keep


def test_the_oracles_kept_sets():
    """The dynamics oracle at xi 1/8 keeps only rows with the target's dynamics (3/8 of all rows have gap 0, so an
    eighth of a batch is always there); the full oracle at lambda 0.5 keeps them too, and more expert rows; a
    filter that scores at random keeps the data's mix."""
    d = fake_truth_data()
    noise = torch.rand(d["n_src"], generator=torch.Generator().manual_seed(1))
    acc = truth.filter_accuracy(d, noise, None, keep_top(16, 1.0), 128, seed=0)
    assert acc["kept/oracle_h/gap_zero_share"] == 1.0 and acc["kept/oracle_h/gap_mean"] == 0.0
    assert 0.3 < acc["kept/filter/gap_zero_share"] < 0.45  # about the data's 3/8
    assert "value_misassign_cross" not in acc  # no A without stage 3
    acc = truth.filter_accuracy(d, noise, torch.zeros(d["n_src"]), keep_top(16, 0.5), 128, seed=0)
    assert acc["kept/oracle_full/quality_share/expert"] > acc["kept/oracle_h/quality_share/expert"] + 0.2
    assert acc["kept/oracle_full/domain_share/exact"] > 0.9


# ---- the flags -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("overrides,message", [
    (dict(variant="target", oracle="full"), "--oracle applies to the filtered variants"),
    (dict(variant="merged", filter_only=True), "--filter-only measures a filter"),
    (dict(oracle="dynamics", dynamics_score="ot"), "--oracle replaces the dynamics score h"),
])
def test_oracle_and_filter_only_bad_input(script, overrides, message, tiny_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [f"{script}.py"])
    m = SCRIPTS[script]
    with pytest.raises(SystemExit) as e:
        m.main(m.Args(env_id=tiny_data["env_id"], source=tiny_data["source"], source_size=tiny_data["source_size"],
                      target_size=tiny_data["target_size"], **overrides))
    assert message in str(e.value) and "\n" not in str(e.value) and os.listdir(tmp_path) == []


def test_oracle_stages_and_row_names():
    m = SCRIPTS["v2a_iql"]
    assert m.run_stages(m.Args(oracle="dynamics")) == (1, 2, 3) and m.run_stages(m.Args(oracle="full")) == ()
    assert m.run_stages(m.Args(variant="dvdf", oracle="dynamics")) == (3,)
    assert m.row_name(m.Args(oracle="dynamics")) == "v2a-oracle-h" and m.row_name(m.Args(variant="igdf")) == "igdf"


@pytest.mark.parametrize("script", SCRIPTS)
def test_filter_only_writes_the_accuracy_and_trains_no_policy(script, tiny_data, tmp_path):
    proc = run(script, tmp_path, *tiny_data["base_args"], *TINY_BUDGETS, "--variant", "dvdf", "--filter-only")
    (run_dir,) = [os.path.join(tmp_path, "runs", x) for x in os.listdir(tmp_path / "runs")]
    results = json.load(open(os.path.join(run_dir, "results.json")))
    assert results["filter_only"] and "evals" not in results and "filter accuracy" in proc.stdout
    acc = results["filter_accuracy"]
    # one quality per domain in the tiny mixture: pairs of qualities only across domains
    assert acc["value_misassign_within"] is None and 0 <= acc["value_misassign_cross"] <= 1
    assert 0 < acc["kept/filter/domain_share/gravity-0.5"] < 1
    assert sorted(f for f in os.listdir(run_dir) if f.endswith(".pt")) == ["stage3.pt", "stage4.pt"]


def test_filter_only_measures_h_against_the_gap_and_the_oracle_keeps_as_its_truth(tiny_data, tmp_path):
    """With datasets that record the gap: h's rank correlation with it is measured, and under --oracle dynamics the run's
    own filter keeps exactly the rows the dynamics oracle keeps (the same scores on the same batches)."""
    for cwd, extra in ((tmp_path / "h", []), (tmp_path / "oracle", ["--oracle", "dynamics"])):
        cwd.mkdir()
        run("v2a_iql", cwd, *tiny_data["base_args"], *TINY_BUDGETS, "--variant", "dvdf", "--filter-only", *extra)
    results = {k: next((tmp_path / k / "runs").glob("*/results.json")) for k in ("h", "oracle")}
    acc = {k: json.load(open(path))["filter_accuracy"] for k, path in results.items()}
    assert -1 <= acc["h"]["dyn_spearman"] <= 1 and 0 <= acc["h"]["dyn_domain_order"] <= 1
    assert acc["h"]["gap_mean/gravity-0.5"] == pytest.approx(0.039, abs=0.002)  # half of g over one 0.008 s step
    oracle = acc["oracle"]
    assert oracle["dyn_spearman"] == pytest.approx(1.0)  # h is the gap's rank itself
    assert all(oracle[f"kept/filter/{k}"] == oracle[f"kept/oracle_h/{k}"] for k in ("gap_mean", "gap_zero_share"))


def test_oracle_on_datasets_without_the_gap_is_one_line(tiny_data, tmp_path, monkeypatch):
    """Datasets made before data_gen.py recorded the gap: --oracle stops in one line that names the regenerate command,
    before a run folder exists (a normal run of the same datasets trains, test_truth)."""
    from test_truth import ids, make_old
    path = shutil.copytree(tiny_data["minari_path"], tmp_path / "minari")
    make_old(path, ids(tiny_data)[0][1])
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(path))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["v2a_iql.py"])
    m = SCRIPTS["v2a_iql"]
    with pytest.raises(SystemExit) as e:
        m.main(m.Args(env_id=tiny_data["env_id"], source=tiny_data["source"], source_size=tiny_data["source_size"],
                      target_size=tiny_data["target_size"], oracle="full"))
    msg = str(e.value)
    assert "--oracle needs the true dynamics gap" in msg and "--overwrite" in msg and "\n" not in msg
    assert not os.path.exists(tmp_path / "runs")
