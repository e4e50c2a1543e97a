"""The optimal-transport dynamics score (--dynamics-score ot, OTDF; docs/specification.md §10): the score and the plan on
hand-checkable points, the chunked and subsampled computation against the exact one, the three OT rows (OTDF,
DVDF-OTDF, V2A-OTDF) end to end in both files, with --reuse-stages, and OTDF's dataset constraint (--dataset-constraint,
IQL): its VAE, its gradient, and a run that resumes to the same weights.

Run as a script, it prints the agreement check of docs/specification.md §10 on the default Hopper datasets:
    MINARI_DATASETS_PATH=<folder with them> python tests/test_ot.py [--rows 10000]"""
import glob
import json
import math
import os
import shutil
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from conftest import validate_args  # noqa: E402

import v2a_iql as v  # noqa: E402
import v2a_utils  # noqa: E402
from v2a_utils import otdf, training  # noqa: E402

OT_ROWS = {"otdf": "igdf", "dvdf-otdf": "dvdf", "v2a-otdf": "v2a"}  # row -> --variant (with --dynamics-score ot)
STAGE_FILES = {"otdf": [4, 5], "dvdf-otdf": [3, 4, 5], "v2a-otdf": [1, 2, 3, 4, 5]}


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    """Rank correlation (no ties in continuous scores): Pearson's r of the ranks."""
    rank = lambda t: torch.argsort(torch.argsort(t)).double()
    rx, ry = rank(x) - rank(x).mean(), rank(y) - rank(y).mean()
    return float((rx * ry).sum() / (rx.norm() * ry.norm()))


# ---- the score on hand-checkable points ------------------------------------------------------------------------------
def test_ot_score_prefers_a_source_point_on_the_target():
    """Target: 4 points near direction e1. Source: one point on e1 (it coincides with target points) and one on e2
    (cosine cost 1 to all of them): the first scores higher, and the scores lie in [-1, 0]."""
    tgt = torch.tensor([[1.0, 0.0, 0.0], [2.0, 0.0, 0.0], [1.0, 0.1, 0.0], [1.0, 0.0, 0.1]])
    src = torch.tensor([[3.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    c = otdf.ot_scores(src, tgt, seed=0)
    assert c[0] > c[1] and -1.0 <= c.min() and c.max() <= 0.0
    assert c[1] < -0.9 and c[0] > -0.01  # its mass goes at (scaled) costs 0.9 to 1; the other's at about 0


def test_ot_plan_marginals_are_uniform():
    torch.manual_seed(0)
    src, tgt = torch.randn(30, 5), torch.randn(20, 5) + 0.5
    plan, cost = otdf.ot_plan(src, tgt)
    assert plan.shape == (30, 20) and (plan >= 0).all() and cost.max().item() == pytest.approx(1.0)
    assert plan.dtype == torch.float32  # the fast path: this problem fits float32's range
    assert torch.allclose(plan.sum(1), torch.full((30,), 1 / 30), rtol=1e-5)  # the rows: exact up to float32 rounding
    assert torch.allclose(plan.sum(0), torch.full((20,), 1 / 20), rtol=1e-3)  # the columns: converged


def test_ot_plan_survives_an_outlier():
    """A source row far from a tight target cloud: epsilon (5 % of the mean scaled cost) is so small that its kernel
    row e^(-C/epsilon) underflows in float32 and float64; the log-domain fallback still transports its mass."""
    g = torch.Generator().manual_seed(0)
    tgt = torch.tensor([1.0, 0, 0]) + 1e-3 * torch.randn(50, 3, generator=g)
    src = torch.cat([torch.tensor([1.0, 0, 0]) + 1e-3 * torch.randn(50, 3, generator=g), torch.tensor([[-1.0, 0, 0]])])
    plan, _ = otdf.ot_plan(src, tgt)
    assert torch.allclose(plan.sum(1) * 51, torch.ones(51, dtype=plan.dtype), rtol=1e-6)
    c = otdf.ot_scores(src, tgt, seed=0)
    assert c[-1].item() == pytest.approx(-1.0, abs=1e-3) and c[:-1].min() > -1e-3


def test_ot_batch_norm():
    c = torch.tensor([[-0.5, -0.2, -0.3], [1.0, 3.0, 2.0]])
    assert torch.allclose(otdf.ot_batch_norm(c), torch.tensor([[-1.0, 0.0, -1 / 3], [-1.0, 0.0, -0.5]]), atol=1e-6)


def test_chunked_subsampled_scores_agree_with_exact():
    """Three clusters of source points at different distances from the target cloud: the chunked (4 chunks) and
    subsampled (half the target) scores rank the rows as the exact single problem does, and are deterministic."""
    g = torch.Generator().manual_seed(0)
    centre = torch.tensor([1.0, 0.5, 0.0, 0.2])
    tgt = centre + 0.3 * torch.randn(400, 4, generator=g)
    src = torch.cat([centre + shift + 0.3 * torch.randn(300, 4, generator=g)
                     for shift in (torch.zeros(4), torch.tensor([0.0, 1.0, 1.0, 0.0]), torch.tensor([-2.0, 0, 2, 0]))])
    exact = otdf.ot_scores(src, tgt, seed=0, chunk=len(src), n_target=len(tgt))
    approx = otdf.ot_scores(src, tgt, seed=1, chunk=len(src) // 4, n_target=len(tgt) // 2)
    assert spearman(exact, approx) > 0.95
    assert torch.equal(approx, otdf.ot_scores(src, tgt, seed=1, chunk=len(src) // 4, n_target=len(tgt) // 2))
    means = [approx[k * 300:(k + 1) * 300].mean() for k in range(3)]
    assert means[0] > means[1] > means[2]  # the score ranks the clusters by their distance to the target


# ---- end to end: the three OT rows in both files, and --reuse-stages ------------------------------------------------
# every row with IQL; TD3+BC (the same code outside its backbone, test_files_identical_outside_backbone) with V2A-OTDF
@pytest.mark.parametrize("row,script", [(row, "v2a_iql") for row in OT_ROWS] + [("v2a-otdf", "v2a_td3bc")])
def test_ot_rows_end_to_end_and_reuse(script, row, tiny_data, tmp_path):
    from test_v2a import TINY_BUDGETS, run
    variant = OT_ROWS[row]
    proc = run(script, tmp_path, *tiny_data["base_args"], *TINY_BUDGETS, "--variant", variant, "--dynamics-score", "ot")
    (run_dir,) = glob.glob(os.path.join(tmp_path, "runs", f"*__{script}__{row}__*"))
    assert sorted(glob.glob(os.path.join(run_dir, "stage*.pt"))) == [os.path.join(run_dir, f"stage{k}.pt")
                                                                      for k in STAGE_FILES[row]]
    c = torch.load(os.path.join(run_dir, "stage4.pt"), weights_only=False)["c_src"]
    assert c.shape == (tiny_data["source_size"],) and (c <= 0).all() and (c >= -1).all()
    assert "[stage 4 OT score] mean per source domain" in proc.stdout and "[stage 4 contrastive" not in proc.stdout
    results = json.load(open(os.path.join(run_dir, "results.json")))
    assert results["row"] == row and results["dynamics_score"] == "ot" and [e[0] for e in results["evals"]] == [50, 100]
    events = open(glob.glob(os.path.join(run_dir, "events.out.tfevents.*"))[0], "rb").read().decode("latin1")
    assert "dynamics/ot_score_mean/" in events and "filter/kept_frac/" in events
    # a second run reuses the stages (the OT scores included) and trains stage 5 with another xi
    (tmp_path / "reuse").mkdir()
    proc = run(script, tmp_path / "reuse", *tiny_data["base_args"], *TINY_BUDGETS, "--variant", variant,
               "--dynamics-score", "ot", "--xi", "0.25", "--reuse-stages", run_dir)
    assert all(f"[stage {k}] loaded" in proc.stdout for k in STAGE_FILES[row][:-1])
    assert "[stage 4 OT score]" not in proc.stdout and "keep 32/128" in proc.stdout
    # a contrastive run cannot reuse the OT scores (and the other way round): other stage-4 settings
    proc = run(script, tmp_path / "reuse", *tiny_data["base_args"], *TINY_BUDGETS, "--variant", variant,
               "--reuse-stages", run_dir, check=False)
    assert proc.returncode != 0 and "stage4.pt was trained with other settings" in proc.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here: the CUDA path is not exercised")
def test_ot_cuda_path(tiny_data, tmp_path):
    """On a CUDA machine: the OT score computed on the GPU agrees with the CPU's, and V2A-OTDF with OTDF's dataset
    constraint runs every stage on the GPU, stage 5 compiled."""
    from test_v2a import TINY_BUDGETS, run
    gen = torch.Generator().manual_seed(0)
    src, tgt = torch.randn(3000, 8, generator=gen), torch.randn(1000, 8, generator=gen) + 0.5
    on_cpu = otdf.ot_scores(src, tgt, seed=0, chunk=1000, n_target=500)
    on_gpu = otdf.ot_scores(src.cuda(), tgt.cuda(), seed=0, chunk=1000, n_target=500)
    assert on_gpu.is_cuda and torch.allclose(on_cpu, on_gpu.cpu(), atol=1e-4)
    proc = run("v2a_iql", tmp_path, *tiny_data["base_args"], *TINY_BUDGETS, "--variant", "v2a", "--dynamics-score", "ot",
               "--dataset-constraint", "0.5", "--vae-steps", "30", "--cuda", "--compile")
    assert "device cuda" in proc.stdout and "[stage 4 OT score] mean per source domain" in proc.stdout
    (run_dir,) = glob.glob(os.path.join(tmp_path, "runs", "*__v2a_iql__v2a-otdf__*"))
    results = json.load(open(os.path.join(run_dir, "results.json")))
    assert [e[0] for e in results["evals"]] == [50, 100] and math.isfinite(results["final_normalized_score"])
    assert "target_vae" in torch.load(os.path.join(run_dir, "stage5.pt"), weights_only=False)


def test_ot_score_flag_needs_a_filtered_variant(tiny_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = v.Args(env_id=tiny_data["env_id"], source=tiny_data["source"], source_size=tiny_data["source_size"],
                  target_size=tiny_data["target_size"], variant="merged", dynamics_score="ot")
    with pytest.raises(SystemExit, match="--dynamics-score applies to the filtered variants"):
        v.main(args)


# ---- OTDF's dataset constraint (--dataset-constraint, IQL backbone) ---------------------------------------------------
def test_target_vae_log_beta_by_hand():
    """With a decoder that outputs the constant c, log beta(a|s) = log(samples) + sum_d log N(a_d; c_d, 0.1)."""
    torch.manual_seed(0)
    vae = otdf.TargetVAE(3, 2, hidden=8)
    last = vae.decoder[-2]
    torch.nn.init.zeros_(last.weight)
    last.bias.data = torch.tensor([0.3, -0.2])  # the decoder outputs tanh(bias) whatever s and z
    c, s, a = torch.tanh(last.bias.data), torch.randn(4, 3), torch.rand(4, 2) * 2 - 1
    by_hand = math.log(10) + (-((a - c) ** 2) / 0.2 - 0.5 * math.log(2 * math.pi * 0.1)).sum(-1)
    assert torch.allclose(vae.log_beta(s, a, samples=10), by_hand, atol=1e-5)


def test_dataset_constraint_pulls_the_actor_to_the_target_behaviour():
    """A VAE fitted to the behaviour a = 0.5 tanh(s[:2]) rates the data's actions above their negatives, and the
    constraint's gradient moves the actor's mean toward the data's action."""
    torch.manual_seed(0)
    s = torch.randn(2048, 5)
    a = 0.5 * torch.tanh(s[:, :2])
    vae = otdf.TargetVAE(5, 2, hidden=64)
    opt = torch.optim.Adam(vae.parameters(), lr=1e-3)
    for _ in range(1500):
        rows = torch.randint(len(s), (128,))
        v2a_utils.optimize(opt, vae.loss(s[rows], a[rows]))
    vae.requires_grad_(False)
    s, a = s[:512], a[:512]
    assert (vae.log_beta(s, a) > vae.log_beta(s, -a)).float().mean() > 0.95
    mean = torch.zeros(len(s), 2, requires_grad=True)  # the actor's tanh(mean) is 0, with a tiny std
    otdf.dataset_constraint_loss(vae, s, torch.cat([mean, torch.full_like(mean, -8.0)], 1), 0.5).backward()
    clear = a.abs() > 0.1  # a descent step on the loss moves tanh(mean) toward a
    assert (torch.sign(-mean.grad[clear]) == torch.sign(a[clear])).float().mean() > 0.9


def test_dataset_constraint_end_to_end_and_resume(tiny_data, tmp_path, monkeypatch):
    """An OTDF run with the constraint (in this process, keeping its step-50 checkpoint aside), then the same run
    killed after that checkpoint and resumed: the VAE is loaded, not refitted, and the final weights are the same."""
    monkeypatch.chdir(tmp_path)
    flags = dict(variant="igdf", dynamics_score="ot", dataset_constraint=0.5, vae_steps=30, repr_steps=20, sql_steps=20,
                 info_steps=20, total_steps=100, eval_freq=50, eval_episodes=1, log_freq=50, compile=False)
    checkpoints, save = {}, training.save

    def keep_stage5(state, path):
        save(state, path)
        if path.endswith("stage5.pt"):
            checkpoints[state["step"]] = open(path, "rb").read()

    monkeypatch.setattr(training, "save", keep_stage5)
    v.main(v.Args(env_id=tiny_data["env_id"], source=tiny_data["source"], source_size=tiny_data["source_size"],
                  target_size=tiny_data["target_size"], **flags))
    (run_dir,) = glob.glob(os.path.join(tmp_path, "runs", "*__v2a_iql__otdf__*"))
    full = torch.load(os.path.join(run_dir, "stage5.pt"), weights_only=False)
    assert sorted(checkpoints) == [50, 100] and "target_vae" in full
    killed = shutil.copytree(run_dir, tmp_path / "killed")
    (killed / "stage5.pt").write_bytes(checkpoints[50])
    from test_v2a import run
    argv = [f"--{k.replace('_', '-')}={val}" for k, val in flags.items() if k != "compile"] + ["--no-compile"]
    proc = run("v2a_iql", tmp_path, *tiny_data["base_args"], *argv, "--resume", str(killed))
    assert "resuming from step 50" in proc.stdout and "target VAE" not in proc.stdout
    resumed = torch.load(killed / "stage5.pt", weights_only=False)
    for net in ("actor", "qf", "vf", "target_vae"):
        for name, w in full[net].items():
            assert torch.equal(w, resumed[net][name]), f"{net}.{name} differs after --resume"


# ---- the agreement check on the default Hopper data (a script, not a test: minutes of CPU, 8 GB of memory) ---------------
@torch.no_grad()
def lean_ot_scores(src: torch.Tensor, tgt: torch.Tensor, iters: int = otdf.OT_ITERS, block: int = 500) -> torch.Tensor:
    """otdf.ot_plan's problem and POT's Sinkhorn iterations (u = a / K v after v = b / K^T u, marginal error every 10th),
    holding only K (float64) in memory: for one source chunk against all target rows, where POT's copies of the
    matrix would not fit. Returns c_i = -n sum_j P_ij C_ij, as otdf.ot_scores."""
    unit = lambda x: torch.nn.functional.normalize(x.double(), dim=1, eps=1e-8)
    xs, xt = unit(src), unit(tgt)
    n, m = len(xs), len(xt)
    K = torch.empty(n, m, dtype=torch.float64)
    for i in range(0, n, block):
        torch.mm(xs[i:i + block], xt.T, out=K[i:i + block])
    K.neg_().add_(1.0)  # the cost
    scale = K.max().item()
    K.div_(scale)
    eps = otdf.OT_EPS * K.mean().item()
    K.div_(-eps).exp_()
    a, b = torch.full((n,), 1.0 / n, dtype=torch.float64), torch.full((m,), 1.0 / m, dtype=torch.float64)
    u, vv = a.clone(), b.clone()
    for it in range(iters):
        vv = b / (K.T @ u)
        u = a / (K @ vv)
        if it % 10 == 0 and torch.linalg.vector_norm(vv * (K.T @ u) - b) < otdf.OT_THRESHOLD:
            break
    out = torch.empty(n, dtype=torch.float64)
    for i in range(0, n, block):
        cost = (1.0 - xs[i:i + block] @ xt.T) / scale
        out[i:i + block] = -(u[i:i + block, None] * K[i:i + block] * vv[None] * cost).sum(1) * n
    return out.float()


def agreement(rows: int = 10_000, seed: int = 0):
    """On `rows` random source rows of the default Hopper mixture (one OTDF chunk): Spearman's rank correlation between
    the exact per-chunk computation of OTDF (the chunk against all 100k target rows, one problem) and this
    implementation's (the chunk against the 5,000-row target subsample; also cut into 4 chunks; another seed)."""
    import time
    args = v.Args(env_id="Hopper-v4", generate=False)
    validate_args(v, args)
    d = v.utils.load_data(args, torch.device("cpu"))
    data, Ns, ds, da = d["data"], d["n_src"], d["ds"], d["da"]
    rows_of = lambda x: torch.cat([x[:, : ds + da], x[:, ds + da + 1 : 2 * ds + da + 1]], 1)
    pick = torch.randperm(Ns, generator=torch.Generator().manual_seed(seed))[:rows]
    src, tgt = rows_of(data[pick]), rows_of(data[Ns:])
    small = otdf.ot_scores(src[:2000], tgt, seed, chunk=2000)  # the lean solver is POT's algorithm: same scores
    sub = tgt[torch.randperm(len(tgt), generator=torch.Generator().manual_seed(seed))[: otdf.OT_TARGET]]
    diff = (lean_ot_scores(src[:2000], sub) - small).abs().max()
    print(f"lean solver vs POT (2000 x {otdf.OT_TARGET}): max |diff| {diff:.2e}")
    t0 = time.time()
    exact = lean_ot_scores(src, tgt)
    print(f"exact ({rows} x {len(tgt)} target rows): {time.time() - t0:.0f} s", flush=True)
    out, approx = {}, {}
    for name, kw in {"subsample": dict(chunk=rows), "subsample + 4 chunks": dict(chunk=rows // 4),
                     "subsample, other seed": dict(chunk=rows, seed=seed + 1)}.items():
        t0 = time.time()
        approx[name] = otdf.ot_scores(src, tgt, **{"seed": seed, **kw})
        out[name] = spearman(exact, approx[name])
        print(f"{name} ({otdf.OT_TARGET} target rows): Spearman {out[name]:.4f} ({time.time() - t0:.0f} s)", flush=True)
    dom = d["dom"][d["traj_id"][pick]]
    for k, name in enumerate(d["dom_names"]):
        print(f"  {name}: mean score exact {exact[dom == k].mean():.4f}, subsample {approx['subsample'][dom == k].mean():.4f}")
    return out


if __name__ == "__main__":
    agreement(int(sys.argv[sys.argv.index("--rows") + 1]) if "--rows" in sys.argv else 10_000)
