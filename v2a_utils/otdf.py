# OTDF's pieces (Lyu et al., ICLR 2025) that the OT rows of v2a_iql.py and v2a_td3bc.py use: the optimal-transport
# dynamics score of stage 4 (--dynamics-score ot: the OTDF, DVDF-OTDF and V2A-OTDF rows) and, with IQL, OTDF's dataset
# constraint (--dataset-constraint). Both come from another method, so they live here and each script holds V2A
# itself; docs/specification.md §10 describes them.
import math
import os
import time
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from v2a_utils.errors import fail, one_line
from v2a_utils.training import Run
from v2a_utils.update import optimize

# OT score (OTDF, docs/specification.md §10): Sinkhorn threshold and iteration cap as OTDF, epsilon = OT_EPS x mean of the
# max-scaled cost (ott-jax 0.4.5's default, which OTDF uses), OTDF's 10,000-row source chunks, a 5,000-row target subsample
OT_THRESHOLD, OT_ITERS, OT_EPS, OT_CHUNK, OT_TARGET = 1e-9, 100, 0.05, 10_000, 5_000


def mlp(inp: int, out: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(inp, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, out))


# ---- The OT dynamics score (stage 4 with --dynamics-score ot) -------------------------------------------------------
def ot_plan(src: torch.Tensor, tgt: torch.Tensor, iters: int = OT_ITERS):
    """OTDF's OT problem (docs/specification.md §10) between source and target rows [s, a, s'], uniform weights: cosine
    cost C = 1 - cos divided by its maximum, entropic regularisation epsilon = OT_EPS x mean C, POT's Sinkhorn for at
    most `iters` iterations or until the marginal error is below OT_THRESHOLD. Returns (P, C). POT's last update is
    that of the rows: every row of P sums to 1 / rows, the columns to about 1 / columns. Float32 kernel iterations
    first (twice as fast; on Hopper the same scores to 2e-6); where exp(-C / epsilon) leaves float32's range, float64,
    then POT's log-domain solver (slow, never underflows)."""
    for backend in ("JAX", "CUPY", "TENSORFLOW"):  # only POT's torch backend is used; importing JAX's would take most
        os.environ.setdefault(f"POT_BACKEND_DISABLE_{backend}", "1")  # of the GPU's memory (JAX preallocates 75 %)
    try:
        import ot  # POT, Python Optimal Transport (requirements.txt); imported here: only this stage needs it
    except ImportError as e:
        fail(f"--dynamics-score ot needs POT ({one_line(e)}): pip install pot==0.9.7.post1")
    for dtype, method in ((torch.float32, "sinkhorn"), (torch.float64, "sinkhorn"), (torch.float64, "sinkhorn_log")):
        cost = 1.0 - F.normalize(src.to(dtype), dim=1, eps=1e-8) @ F.normalize(tgt.to(dtype), dim=1, eps=1e-8).T
        cost /= cost.max().clamp(min=1e-12)
        a, b = (torch.full((n,), 1.0 / n, dtype=dtype, device=src.device) for n in cost.shape)
        with warnings.catch_warnings(record=True) as caught:  # POT warns, and returns a stale plan, on overflow
            warnings.simplefilter("always")
            plan = ot.sinkhorn(a, b, cost, float(OT_EPS * cost.mean()), method=method, numItermax=iters,
                               stopThr=OT_THRESHOLD, warn=False)
        if (not any("numerical errors" in str(w.message) for w in caught) and plan.isfinite().all()
                and torch.allclose(plan.sum(1), a, rtol=1e-3)):
            return plan, cost
    fail(f"the Sinkhorn solver failed on {len(src)} source x {len(tgt)} target rows (numerical errors)")


def ot_scores(src: torch.Tensor, tgt: torch.Tensor, seed: int, chunk: int = OT_CHUNK, n_target: int = OT_TARGET,
              iters: int = OT_ITERS) -> torch.Tensor:
    """Stage 4 with --dynamics-score ot (docs/specification.md §10, OTDF): the OT score of every source row [s, a, s'].
    The source rows, in a random order, are cut into chunks of about `chunk` rows; each chunk is matched to one fixed
    random subsample of `n_target` target rows (all of them if fewer) by ot_plan. A row's score is
    c_i = -sum_j P_ij C_ij times the chunk's row count: minus the mean (max-scaled) cost of the row's transport, in
    [-1, 0], comparable across chunks of unequal size. Returns float32 scores [N_src]."""
    gen = torch.Generator().manual_seed(seed)  # its own RNG: the same scores whichever stages ran before
    if len(tgt) > n_target:
        tgt = tgt[torch.randperm(len(tgt), generator=gen)[:n_target].to(tgt.device)]
    scores = torch.empty(len(src), dtype=torch.float64, device=src.device)
    order = torch.randperm(len(src), generator=gen).to(src.device)  # each chunk: a sample of the whole mixture
    chunks, t0 = order.tensor_split(max(1, round(len(src) / chunk))), time.time()
    for k, idx in enumerate(chunks, 1):
        plan, cost = ot_plan(src[idx], tgt, iters)
        scores[idx] = -(plan * cost).sum(1).double() * len(idx)
        if k % 10 == 0 and k < len(chunks):  # progress: the stage takes minutes on a CPU
            print(f"[stage 4 OT score] chunk {k}/{len(chunks)}  ETA {(time.time() - t0) / k * (len(chunks) - k) / 60:.1f} "
                  f"min", flush=True)
    return scores.float()


def ot_batch_norm(c: torch.Tensor) -> torch.Tensor:
    """§10 (OTDF): the OT score of a batch (last dim) as (c - max c) / (max c - min c), in [-1, 0]; the filter and the
    weight min(exp(.), 100) use it where they use h."""
    lo, hi = c.min(-1, keepdim=True).values, c.max(-1, keepdim=True).values
    return (c - hi) / (hi - lo + 1e-8)


# ---- The dataset constraint (IQL's --dataset-constraint) ----------------------------------------------------------
class TargetVAE(nn.Module):
    """OTDF's model beta(a|s) of the target data's behaviour (Lyu et al. 2025): a conditional VAE, hidden 750, latent
    2 d_a, encoder log-std clamped to [-4, 15], tanh decoder."""

    def __init__(self, ds: int, da: int, hidden: int = 750):
        super().__init__()
        self.latent = 2 * da
        self.encoder = mlp(ds + da, 2 * self.latent, hidden)  # [mean, log_std] of q(z|s,a)
        self.decoder = nn.Sequential(*mlp(ds + self.latent, da, hidden), nn.Tanh())

    def posterior(self, s: torch.Tensor, a: torch.Tensor):
        mean, log_std = self.encoder(torch.cat([s, a], -1)).chunk(2, -1)
        return mean, log_std.clamp(-4, 15).exp()

    def loss(self, s: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """OTDF's VAE loss: squared reconstruction error + 0.5 KL(q(z|s,a) || N(0, I)), both means."""
        mean, std = self.posterior(s, a)
        recon = self.decoder(torch.cat([s, mean + std * torch.randn_like(std)], -1))
        kl = -0.5 * (1 + 2 * std.log() - mean**2 - std**2).mean()
        return F.mse_loss(recon, a) + 0.5 * kl

    def log_beta(self, s: torch.Tensor, a: torch.Tensor, samples: int = 10, var: float = 0.1) -> torch.Tensor:
        """OTDF's estimate of log beta(a|s): logsumexp over `samples` draws z ~ q(z|s,a) of log N(a; dec(s,z), var I)
        (var = 0.4/4 as OTDF's; like OTDF's, no importance weights p(z)/q(z|s,a))."""
        mean, std = self.posterior(s, a)
        z = mean[:, None] + std[:, None] * torch.randn(len(s), samples, self.latent, device=s.device)
        dec = self.decoder(torch.cat([s[:, None].expand(-1, samples, -1), z], -1))
        log_p = (-((a[:, None] - dec) ** 2) / (2 * var) - 0.5 * math.log(2 * math.pi * var)).sum(-1)
        return log_p.logsumexp(-1)


def dataset_constraint_loss(vae: TargetVAE, s: torch.Tensor, actor_out: torch.Tensor, weight: float) -> torch.Tensor:
    """OTDF's actor term -weight log beta(a_pi|s), a_pi a tanh-Gaussian sample of the actor. Divided by d_a: the AWR
    loss here averages over the action dims where OTDF's sums them, so `weight` keeps OTDF's balance of the two."""
    da = actor_out.shape[1] // 2
    mean, log_std = actor_out[:, :da], actor_out[:, da:].clamp(-20, 2)
    a_pi = torch.tanh(mean + log_std.exp() * torch.randn_like(mean))
    return -weight / da * vae.log_beta(s, a_pi).mean()


def fit_target_vae(run: Run) -> TargetVAE:
    """OTDF's pretraining of beta: --vae-steps Adam steps (lr 1e-3) on batches of target rows; then frozen. A --resume
    of stage 5 loads it from the stage-5 checkpoint instead."""
    d, ds, da, dev = run.d, run.d["ds"], run.d["da"], run.dev
    vae = TargetVAE(ds, da).to(dev)
    if 5 not in run.loaded:
        opt = run.adam(vae.parameters(), lr=1e-3)

        def vae_step(i: int):
            x = d["data"][d["n_src"] + torch.randint(d["n_tgt"], (run.args.batch_size,), device=dev)]
            return optimize(opt, vae.loss(x[:, :ds], x[:, ds: ds + da]))[None]

        run.train("stage 5 target VAE (OTDF's dataset constraint)", run.args.vae_steps, vae_step, ["losses/vae_loss"],
                  run.args.log_freq, run.args.bench, 20)
    return vae.requires_grad_(False)
