# V2A with a TD3+BC backbone, and its ablations DVDF, IGDF, merged-data TD3+BC and target-only TD3+BC, in one file.
# paper: Qiao et al., "Unifying Value Alignment and Assignment in Cross-Domain Offline RL with Heterogeneous Datasets",
# ICML 2026, arXiv 2605.24862.  spec: docs/specification.md (TD3+BC: §9).  docs: docs/v2a_td3bc.md
# usage: python v2a_td3bc.py --env-id Hopper-v4 [--variant v2a|dvdf|igdf|merged|target]
import copy
import functools
import math
import os
import random
import signal
import time
from dataclasses import dataclass
from typing import Callable, Literal, NamedTuple, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

import v2a_utils as utils  # the plumbing, as utils.<name>; v2a_utils/__init__.py says which module holds each
from v2a_utils import Run, fail, optimize, otdf, split, stability
from v2a_utils import filter_truth as truth

SCRIPT = os.path.basename(__file__)
VARIANT_STAGES = {"v2a": (1, 2, 3, 4), "dvdf": (3, 4), "igdf": (4,), "merged": (), "target": (), "bc": ()}
PUBLISHED_TRADEOFF = {"v2a": 0.6, "dvdf": 0.7, "igdf": 1.0}  # lambda: docs/specification.md §7.1, §8 (igdf: h only)
# the paper's six filtered rows: (--variant, --dynamics-score) -> name (run directories, results.json); §8, §10
ROW_NAMES = {("igdf", "contrastive"): "igdf", ("dvdf", "contrastive"): "dvdf", ("v2a", "contrastive"): "v2a",
             ("igdf", "ot"): "otdf", ("dvdf", "ot"): "dvdf-otdf", ("v2a", "ot"): "v2a-otdf"}
REPR_BATCH, REPR_CROP, KL_BETA, GRAD_CLIP, SQL_BATCH = 16, 200, 1e-3, 10.0, 256  # docs/specification.md §7.1
PROBE_TRAJ = 500  # trajectories of the domain probe logged during stage 1 (repr/stage1_domain_probe_acc)
# the constants that determined each stage's result, recorded in its checkpoint's key (utils.stage_keys)
STAGE_CONSTANTS = {1: [REPR_BATCH, REPR_CROP, KL_BETA, GRAD_CLIP], 3: [SQL_BATCH],
                   "ot": [otdf.OT_THRESHOLD, otdf.OT_ITERS, otdf.OT_EPS, otdf.OT_CHUNK, otdf.OT_TARGET]}


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    seed: int = 1
    """seed of every stage (the same seed for all of them, docs/specification.md §14 item 12)"""
    torch_deterministic: bool = True
    """if toggled, `torch.backends.cudnn.deterministic=True`"""
    cuda: bool = True
    """if toggled, cuda is used when available"""
    track: bool = False
    """if toggled, the run is mirrored to Weights and Biases (sync_tensorboard)"""
    wandb_project_name: str = "v2a"
    """the wandb project name"""
    wandb_entity: Optional[str] = None
    """the entity (team) of the wandb project"""
    env_id: str = "Hopper-v4"
    """the nominal (target) environment; selects the Minari datasets `v2a/<env-id>/...`"""
    source: Optional[str] = None
    """the source mixture, `domain:quality[@policy_domain][:weight]` entries (same grammar as data_gen.py; `@`: collected
    by that domain's behaviour policy), or a named mixture (`crossed`: Hopper's two domains x two qualities); None: the
    robot's default (Hopper: torso-hard:random,gravity-0.5:expert,legjnt-hard:medium; v2a_utils/mixtures.py)"""
    source_size: int = 1_000_000
    """total transitions of the source mixture"""
    target_size: int = 100_000
    """transitions of the target dataset"""
    generate: bool = True
    """run data_gen.py when the datasets are missing (`--no-generate`: stop with an error instead)"""
    variant: Literal["v2a", "dvdf", "igdf", "merged", "target", "bc"] = "v2a"
    """v2a: h + A(s,a,z); dvdf: h + A(s,a); igdf: h only; merged: TD3+BC on source+target; target: TD3+BC on target;
    bc: behaviour cloning on the target data (the backbone's actor and its regression term alone), the anchor"""
    dynamics_score: Literal["contrastive", "ot"] = "contrastive"
    """the dynamics score h of v2a, dvdf and igdf: contrastive (IGDF's, stage 4 trains it) or ot (OTDF's optimal-
    transport score, stage 4 computes it): --variant igdf --dynamics-score ot is OTDF, dvdf: DVDF-OTDF, v2a: V2A-OTDF"""
    oracle: Literal["none", "dynamics", "full"] = "none"
    """a diagnostic, not a method: the filter with the truth in place of its scores, the upper bound of what each part
    can give (docs/v2a_iql.md, "Filter accuracy"). dynamics: h := the rank of each source row's true dynamics gap
    (stage 4 is not trained); full: A := the rank of its behaviour label as well (stages 1-4 are not trained). Needs
    datasets that record the gap"""
    filter_only: bool = False
    """stop after stage 4: score every source row, write the filter's accuracy against the truth (TensorBoard
    filter/accuracy/..., results.json filter_accuracy) and exit without training a policy (many seeds of stages 1-4
    cheaply; a later --resume without it trains stage 5)"""
    tradeoff: Optional[float] = None
    """lambda, the weight of h in f = lambda h + (1 - lambda) minmax(A); None: the variant's published value"""
    xi: float = 0.5
    """the kept fraction of each source batch"""
    repr_steps: int = 100_000
    """TC-ELBO iterations (E-step + M-step each), as the official code (docs/specification.md §14 item 5)"""
    sql_steps: int = 100_000
    """Sparse-Q-Learning steps of the advantage model (docs/specification.md §14 item 4)"""
    info_steps: int = 7000
    """contrastive pre-training steps of the dynamics score h"""
    total_steps: int = 1_000_000
    """filtered-TD3+BC gradient steps"""
    eval_freq: int = 10_000
    """evaluate the policy in the target env, and checkpoint stage 5, every this many steps and after the last"""
    eval_episodes: int = 10
    """episodes per periodic evaluation (the learning curves)"""
    final_eval_episodes: int = 50
    """episodes of the final evaluation of the last policy, the run's score (results.json final_eval), on episode seeds
    that no periodic evaluation uses"""
    log_freq: int = 1000
    """read the losses (one host sync) and print progress every this many steps"""
    z_dim: int = 128
    """dimension of the modality latent z"""
    sql_alpha: float = 0.2
    """SQL sparsity alpha"""
    batch_size: int = 128
    """source and target samples per stage-5 step (and the contrastive batch)"""
    learning_rate: float = 3e-4
    """Adam learning rate of every network"""
    gamma: float = 0.99
    """discount (the release's 0.99). On the 100k Hopper target, whose falls lie beyond 0.99's horizon, gamma 0.999
    with tau 0.05 helped target-only and merged IQL, did no better on a 5k target and worse with V2A (README, "backbone")"""
    tau: float = 0.005
    """Polyak rate of the target Q networks (one Bellman backup takes about 1/tau steps)"""
    sql_gamma: Optional[float] = None
    """stage 3's discount, that of the advantage A the filter ranks by; None: --gamma, as the release. --gamma 0.999
    --sql-gamma 0.99 changes the stage-5 backbone alone (and can --reuse-stages a run made at 0.99)"""
    sql_tau: Optional[float] = None
    """stage 3's Polyak rate; None: --tau, as the release"""
    resume: Optional[str] = None
    """`runs/<name>`: continue that run (finished stages are loaded, stage 5 continues from its checkpoint) with the
    run's own flags, read from its args.json: `--resume runs/<name>` alone suffices. A flag given with it must have the
    run's value, except --total-steps, which may grow, and those that do not change training (--log-freq, --compile,
    --track, ...)"""
    reuse_stages: Optional[str] = None
    """`runs/<name>`: load stages 1-4 of that run and train stage 5 afresh (lambda / xi sweeps); the stages must
    come from the same datasets, seed, variant stages and stage flags (either script)"""
    compile: bool = True
    """compile the whole stage-5 update with torch.compile (on CUDA as a CUDA graph): 1.2-1.7x the eager rate on a
    CPU core, after a cold compile of 1-2 min (inductor caches it; later runs take about 20 s). `--no-compile` runs the
    same update eagerly, the reference"""
    threads: int = 1
    """CPU threads of torch and of the compiled update's kernels. The networks are small, and a run with more threads
    than free cores waits at every step for a parked thread: 2 threads beside two other runs on a 2-core CPU ran 6x
    slower than 1 (docs/speed.md). Raise it only where cores are idle, and measure with --bench"""
    bench: int = 0
    """time every stage of the variant (warm-up, then this many steps; TC-ELBO N/50 iterations) and exit; nothing is
    trained to completion or saved"""
    # >>> backbone: TD3+BC (Fujimoto & Gu 2021) hyperparameters
    alpha: float = 2.5
    """TD3+BC alpha: actor loss -alpha / mean|Q1| * Q1(s, pi(s)) + (pi(s) - a)^2"""
    policy_noise: float = 0.2
    """std of the target-policy smoothing noise (times max_action = 1)"""
    noise_clip: float = 0.5
    """clip of the target-policy smoothing noise (times max_action = 1)"""
    policy_freq: int = 2
    """the actor and all target networks are updated every this many critic updates"""
    normalize_states: bool = True
    """feed the stage-5 networks states normalised with the target rows' mean and std (eps 1e-3), as TD3+BC prescribes:
    in the data once and in evaluation (utils.stage5_data)"""
    reward_scale: Literal["none", "episode-range"] = "none"
    """stage-5 rewards: none (raw, as TD3+BC and the release) or x 1000 / (max - min episode return) over every episode
    the run loads (IQL's rule; utils.stage5_data)"""
    # <<< backbone


def row_name(args: Args) -> str:
    """The paper's row a run belongs to, e.g. v2a-otdf (run directories, results.json); an oracle's: v2a-oracle-h."""
    row = ROW_NAMES.get((args.variant, args.dynamics_score), args.variant)
    return row + {"none": "", "dynamics": "-oracle-h", "full": "-oracle-full"}[args.oracle]


def run_stages(args: Args) -> tuple:
    """The stages before stage 5 that the run trains: its variant's, less those whose scores an oracle replaces."""
    replaced = {"none": (), "dynamics": (4,), "full": (1, 2, 3, 4)}[args.oracle]
    return tuple(k for k in VARIANT_STAGES[args.variant] if k not in replaced)


def tradeoff(args: Args) -> float:
    """lambda of the filter: --tradeoff, or the variant's published value (0 for the unfiltered variants)."""
    return PUBLISHED_TRADEOFF.get(args.variant, 0.0) if args.tradeoff is None else args.tradeoff


# ---- Networks -------------------------------------------------------------------------------------------------------
def mlp(inp: int, out: int, hidden: int = 256, layernorm: bool = False) -> nn.Sequential:
    """2x256 ReLU MLP; layernorm: a layer normalisation without parameters before each ReLU (a critic fix flag; it
    shifts the layers' indices, so only the flag's own checkpoints hold those keys)."""
    norm = lambda: [nn.LayerNorm(hidden, elementwise_affine=False)] if layernorm else []
    return nn.Sequential(nn.Linear(inp, hidden), *norm(), nn.ReLU(), nn.Linear(hidden, hidden), *norm(), nn.ReLU(),
                         nn.Linear(hidden, out))


class EnsembleMLP(nn.Module):
    """E independent 2x256 ReLU MLPs as one batched matmul per layer (weights [E, in, out], torch.baddbmm): the twin
    critics (E = 2) and the TC-ELBO decoder ensemble (E = 3, rlkit init: biases 0.1, last layer U(+-3e-3))."""

    def __init__(self, ensemble: int, inp: int, out: int, hidden: int = 256, decoder_init: bool = False,
                 layernorm: bool = False):
        super().__init__()
        self.layernorm = layernorm  # a layer normalisation without parameters before each hidden ReLU (a critic fix)
        dims = [inp, hidden, hidden, out]
        self.w, self.b = nn.ParameterList(), nn.ParameterList()
        for i, (m, n) in enumerate(zip(dims[:-1], dims[1:])):
            last = i == len(dims) - 2
            bound = 3e-3 if decoder_init and last else m**-0.5  # fan-in uniform otherwise, as nn.Linear
            self.w.append(nn.Parameter(torch.empty(ensemble, m, n).uniform_(-bound, bound)))
            bias = torch.empty(ensemble, 1, n).uniform_(-bound, bound)
            self.b.append(nn.Parameter(bias.fill_(0.1) if decoder_init and not last else bias))

    def forward(self, x: torch.Tensor, z: Optional[torch.Tensor] = None, group: Optional[torch.Tensor] = None, member=None):
        """x [N, in] (shared by all members) or [E, N, in] -> [E, N, out]. With z [G, dz] and group [N], the input of
        row i is [x_i, z_group[i]]: z's share of the first layer is computed once per z, not per row (the same
        function, fewer FLOPs: the TC-ELBO decoder sees one z per 200-step window). member k: member k alone, [1, N, out]."""
        sel = slice(None) if member is None else slice(member, member + 1)  # a loss that reads Q1 only: 1/E of the work
        E = self.w[0][sel].shape[0]
        x = x.expand(E, *x.shape) if x.dim() == 2 else x
        for i, (w, b) in enumerate((w[sel], b[sel]) for w, b in zip(self.w, self.b)):
            if i == 0 and z is not None:
                nx = x.shape[-1]
                x = torch.baddbmm(b, x, w[:, :nx]) + torch.matmul(z, w[:, nx:])[:, group]
            else:
                x = torch.baddbmm(b, x, w)
            if i < len(self.w) - 1:
                x = F.relu(F.layer_norm(x, x.shape[-1:]) if self.layernorm else x)
        return x


class TrajectoryEncoder(nn.Module):
    """q(z | tau): GRU over x_t = [s_t, a_t, s_{t+1} - s_t]; Gaussian heads on the output at the last valid step."""

    def __init__(self, inp: int, z_dim: int, hidden: int = 256):
        super().__init__()
        self.gru = nn.GRU(inp, hidden, batch_first=True)
        self.mu, self.log_std = nn.Linear(hidden, z_dim), nn.Linear(hidden, z_dim)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor):  # x [B, T, inp], lengths [B] >= 1
        # the GRU runs over the valid steps of each sequence only, not over the padding after them (a GRU is causal,
        # so the state at the last valid step is the same)
        last = utils.gru_last_state(self.gru, x, lengths)
        return self.mu(last), self.log_std(last).clamp(-5.0, 2.0)


# ---- Losses and filter (docs/specification.md §5.1-§5.6), small functions so that the tests check them by hand ---
def tc_elbo_losses(decoder, s, a, delta, mask, z, mu, log_std):
    """Eq. 5.1: L_rec = sum_k sum_bt m ||f_k(s, a, z) - (s' - s)||^2 / (sum m * d_s * K), and
    KL(q(z|tau) || N(0, I)) summed over z dims, averaged over trajectories. s, a, delta [B, T, .], mask [B, T]."""
    B, T, ds = delta.shape
    valid = mask.reshape(-1).nonzero().squeeze(1)  # m = 0 rows (padding) add nothing: the decoder skips them
    sa = torch.cat([s, a], -1).reshape(B * T, -1)[valid]
    pred = decoder(sa, z, group=valid // T).float()  # f_k([s, a, z]) for every member k: [K, rows, ds]
    err = ((pred - delta.reshape(B * T, ds)[valid]) ** 2).sum(-1) * mask.reshape(-1)[valid]
    kl = (-0.5 * (1 + 2 * log_std - mu**2 - (2 * log_std).exp()).sum(-1)).mean()
    return err.sum() / (mask.sum() * ds * pred.shape[0]), kl


def sql_v_loss(q_min: torch.Tensor, v: torch.Tensor, alpha: float) -> torch.Tensor:
    """Eq. 5.3: E[1{1 + A/(2 alpha) > 0} (1 + A/(2 alpha))^2 + V/alpha], A = min(target Q1, Q2) - V."""
    sp = (q_min - v) / (2 * alpha) + 1.0
    return ((sp > 0).float() * sp**2 + v / alpha).mean()


def td_loss(q: torch.Tensor, y: torch.Tensor, w: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Eq. 5.3 / 5.6: sum over critics of mean_batch w (Q_i - y)^2; q [E, N], y and w [N]."""
    se = (q - y) ** 2
    return (se if w is None else se * w).mean(-1).sum()


# >>> backbone: TD3+BC losses
def td3bc_actor_loss(q1_pi: torch.Tensor, pi: torch.Tensor, a: torch.Tensor, alpha: float) -> torch.Tensor:
    """TD3+BC: -lambda mean Q1(s, pi(s)) + mean (pi(s) - a)^2 with lambda = alpha / mean|Q1(s, pi(s))| (detached)."""
    return -alpha / q1_pi.abs().mean().detach() * q1_pi.mean() + F.mse_loss(pi, a)


def smoothed_target_action(pi_next: torch.Tensor, noise_std: float, noise_clip: float) -> torch.Tensor:
    """TD3 target-policy smoothing: clip(pi_target(s') + clip(N(0, noise_std^2), -c, c), -1, 1)."""
    return (pi_next + (torch.randn_like(pi_next) * noise_std).clamp(-noise_clip, noise_clip)).clamp(-1.0, 1.0)


def backbone_errors(args: Args) -> list[str]:
    """The backbone's own flags, checked with all others before anything runs."""
    return [msg for bad, msg in [
        (not 0 <= args.alpha < math.inf, f"--alpha must be finite and >= 0, got {args.alpha}"),
        (not (0 <= args.policy_noise < math.inf and 0 <= args.noise_clip < math.inf),
         f"--policy-noise and --noise-clip must be finite and >= 0; got {args.policy_noise}, {args.noise_clip}"),
        (args.policy_freq < 1, f"--policy-freq must be >= 1, got {args.policy_freq}"),
    ] if bad]


BACKBONE, STAGE5_TIME = "TD3+BC", "1M filtered-TD3+BC steps about 1.2 h"  # names for the logs and --help
# <<< backbone


def info_nce_loss(phi: torch.Tensor, psi_pos: torch.Tensor, psi_neg: torch.Tensor) -> torch.Tensor:
    """Eq. 5.4, binary NCE: logits [B, B] = [phi_i . psi(s'_i) | phi_i . psi(s'_src_j)], label 1 in column 0 only."""
    logits = torch.cat([(phi * psi_pos).sum(-1, keepdim=True), phi @ psi_neg.T], 1)
    labels = torch.zeros_like(logits)
    labels[:, 0] = 1.0
    return F.binary_cross_entropy_with_logits(logits, labels)


def cosine_score(phi: torch.Tensor, psi: torch.Tensor) -> torch.Tensor:
    """Eq. 5.4: h(s, a, s') = phi . psi / (|phi| |psi| + 1e-8), in [-1, 1]."""
    return (phi * psi).sum(-1) / (phi.norm(dim=-1) * psi.norm(dim=-1) + 1e-8)


def filter_scores(h: torch.Tensor, adv: torch.Tensor, tradeoff: float):
    """Eq. 5.5: f = lambda h + (1 - lambda) minmax(A), min-max over the last (batch) dim. Returns f and minmax(A)."""
    lo, hi = adv.min(-1, keepdim=True).values, adv.max(-1, keepdim=True).values
    adv_norm = (adv - lo) / (hi - lo + 1e-8)
    return tradeoff * h + (1 - tradeoff) * adv_norm, adv_norm


def kept_count(batch: int, xi: float) -> int:
    return max(1, min(batch, math.floor(xi * batch)))


def select_kept(f: torch.Tensor, n: int) -> torch.Tensor:
    """Eq. 5.5: indices of the n highest scores along the last dim (fixed shape, no host sync)."""
    return torch.topk(f, n, dim=-1).indices


def source_weight(h: torch.Tensor) -> torch.Tensor:
    """Eq. 5.5: Q-loss weight of a kept source sample, min(exp(h), 100)."""
    return h.exp().clamp(max=100.0)


# ---- Stage 1: TC-ELBO modality encoder (eq. 5.1) --------------------------------------------------------------------
def train_encoder(run: Run) -> Optional[TrajectoryEncoder]:
    """E-step: L_rec + beta KL with a sampled z, decoder frozen; M-step: L_rec with the posterior-mean z, encoder
    frozen. 16 trajectories per iteration, random 200-step crops. None for variants without z."""
    args, d, dev = run.args, run.d, run.dev
    data, ds, da, n_traj = d["data"], d["ds"], d["da"], len(d["traj_len"])
    # every stage creates its networks whatever the variant, so variants that train nothing before a stage start its
    # networks alike (merged, target and bc share stage 5's start); a stage that trains draws from the random stream,
    # so the networks made after it start elsewhere: across variants of one seed, stages 3-5 are not paired
    encoder = TrajectoryEncoder(2 * ds + da, args.z_dim).to(dev)
    decoder = EnsembleMLP(3, ds + da + args.z_dim, ds, decoder_init=True).to(dev)
    if 1 not in run.stages:
        return None
    if (ck := run.checkpoint(1)) is not None:
        encoder.load_state_dict(ck["encoder"])
        decoder.load_state_dict(ck["decoder"])
        return encoder
    enc_opt, dec_opt = run.adam(encoder.parameters()), run.adam(decoder.parameters())

    def repr_step(i):
        tid = torch.randint(n_traj, (REPR_BATCH,), device=dev)
        L = d["traj_len"][tid]
        T = int(L.max().clamp(max=REPR_CROP))  # one host sync: pad to the longest window, as the official code does
        off = (torch.rand(len(tid), device=dev) * ((L - T).clamp(min=0) + 1)).long()  # random crop start
        lens, ar = L.clamp(max=T), torch.arange(T, device=dev)
        idx = d["traj_start"][tid, None] + off[:, None] + torch.minimum(ar[None], lens[:, None] - 1)
        mask = (ar[None] < lens[:, None]).float()
        s, a, _, s2, _ = split(data[idx], ds, da)
        seq = torch.cat([s, a, s2 - s], -1)
        mu, log_std = encoder(seq, lens)
        z = mu + log_std.exp() * torch.randn_like(mu)  # E-step
        rec, kl = tc_elbo_losses(decoder, s, a, s2 - s, mask, z, mu, log_std)
        optimize(enc_opt, rec + KL_BETA * kl, list(encoder.parameters()), GRAD_CLIP)  # decoder frozen
        with torch.no_grad():  # M-step: posterior mean of the updated, frozen encoder
            mu_m = encoder(seq, lens)[0]
        rec_m = tc_elbo_losses(decoder, s, a, s2 - s, mask, mu_m, mu_m, log_std.detach())[0]
        rec_m = optimize(dec_opt, rec_m, list(decoder.parameters()), GRAD_CLIP)
        return torch.stack([rec.detach(), kl.detach(), rec_m])

    # how well z separates the domains while stage 1 trains (20 points a run): when it flattens, more iterations buy
    # nothing. A fixed subsample of trajectories, its own RNG: the training is the same with or without it
    probe_ids = torch.randperm(n_traj, generator=torch.Generator().manual_seed(args.seed))[:PROBE_TRAJ].to(dev)
    probe_every = max(args.log_freq, args.repr_steps // 20)

    def probe(i):
        if i % probe_every == 0 or i == args.repr_steps:
            acc = utils.domain_probe(relabel(encoder, d, probe_ids), d["dom"][probe_ids], len(d["dom_names"]), args.seed)
            run.writer.add_scalar("repr/stage1_domain_probe_acc", acc, i)

    if run.train("stage 1 TC-ELBO", args.repr_steps, repr_step, ["repr/rec_loss", "repr/kl", "repr/rec_loss_mstep"],
                 max(1, args.log_freq // 10), max(5, args.bench // 50), 5, after_step=probe):
        run.save(1, encoder=encoder.state_dict(), decoder=decoder.state_dict())
    return encoder


# ---- Stage 2: relabel each source trajectory with the posterior mean z of the full trajectory (eq. 5.2) --------------
@torch.no_grad()
def relabel(encoder: TrajectoryEncoder, d: dict, ids: Optional[torch.Tensor] = None, chunk: int = 64) -> torch.Tensor:
    """Eq. 5.2: z_tau = posterior mean of the FULL trajectory (<= 1000 steps, no crop), one row per trajectory (of
    trajectories `ids`; None: all)."""
    ids = torch.arange(len(d["traj_len"]), device=d["data"].device) if ids is None else ids
    z = torch.empty(len(ids), encoder.mu.out_features, device=d["data"].device)
    for c in torch.argsort(d["traj_len"][ids]).split(chunk):  # similar lengths in a chunk: little padding
        L = d["traj_len"][ids[c]]
        idx = d["traj_start"][ids[c], None] + torch.minimum(torch.arange(int(L.max()), device=L.device)[None], L[:, None] - 1)
        s, a, _, s2, _ = split(d["data"][idx], d["ds"], d["da"])
        z[c] = encoder(torch.cat([s, a, s2 - s], -1), L)[0]
    return z


def relabel_stage(run: Run, encoder: Optional[TrajectoryEncoder]) -> torch.Tensor:
    """z per source trajectory [n_traj, z_dim]; [n_traj, 0] for variants without z, so that Q(s,a,z) = Q(s,a)."""
    n_traj = len(run.d["traj_len"])
    if 2 not in run.stages:
        return torch.zeros(n_traj, 0, device=run.dev)
    if (ck := run.checkpoint(2)) is not None:
        if ck["z_traj"].shape != (n_traj, run.args.z_dim):
            fail(f"stage2.pt holds z for {ck['z_traj'].shape[0]} trajectories, but the source data has {n_traj}")
        return ck["z_traj"]
    z_traj = relabel(encoder, run.d)
    if not run.bench:
        run.save(2, z_traj=z_traj)
        utils.z_diagnostics(z_traj, run.d, run.writer, run.args.seed)
    return z_traj


def with_z(z_traj: torch.Tensor, d: dict, v: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """[v, z] for source rows idx: a row's z is its trajectory's."""
    return torch.cat([v, z_traj[d["traj_id"][idx]]], 1)


# ---- Stage 3: modality-aware advantage (eq. 5.3) ---------------------------------------------------------------------
def train_advantage(run: Run, z_traj: torch.Tensor) -> tuple[EnsembleMLP, nn.Module]:
    """Sparse Q-Learning Q(s,a,z), V(s,z) on the source data, alpha 0.2: V update, Q update, Polyak every 2nd step.
    The filter uses A = min(Q1, Q2) - V of the ONLINE Q nets."""
    args, d, dev = run.args, run.d, run.dev
    data, ds, da, Ns, dz = d["data"], d["ds"], d["da"], d["n_src"], z_traj.shape[1]
    sql_q, sql_v = EnsembleMLP(2, ds + da + dz, 1).to(dev), mlp(ds + dz, 1).to(dev)
    if 3 not in run.stages:
        return sql_q, sql_v
    if (ck := run.checkpoint(3)) is not None:
        sql_q.load_state_dict(ck["q"])
        sql_v.load_state_dict(ck["v"])
        return sql_q, sql_v
    sql_qt = copy.deepcopy(sql_q).requires_grad_(False)
    q_opt, v_opt = run.adam(sql_q.parameters()), run.adam(sql_v.parameters())
    zs = functools.partial(with_z, z_traj, d)
    gamma, tau = utils.sql_discount(args)

    def sql_step(i):
        idx = torch.randint(Ns, (SQL_BATCH,), device=dev)
        x = data[idx]
        s, a, r, s2, done = split(x, ds, da)
        with torch.no_grad():
            q_min = sql_qt(zs(x[:, : ds + da], idx)).min(0).values.squeeze(-1)
        v_loss = optimize(v_opt, sql_v_loss(q_min, sql_v(zs(s, idx)).squeeze(-1), args.sql_alpha))
        with torch.no_grad():  # V(s', z) with the transition's own z (docs/specification.md §14 item 13)
            y = r + gamma * (1 - done) * sql_v(zs(s2, idx)).squeeze(-1)
        q_loss = optimize(q_opt, td_loss(sql_q(zs(x[:, : ds + da], idx)).squeeze(-1), y))
        if i % 2 == 0:
            with torch.no_grad():
                torch._foreach_lerp_(list(sql_qt.parameters()), list(sql_q.parameters()), tau)
        return torch.stack([v_loss, q_loss])

    if run.train(f"stage 3 SQL {'Q(s,a,z)' if dz else 'Q(s,a)'}", args.sql_steps, sql_step,
                 ["losses/sql_v_loss", "losses/sql_q_loss"], args.log_freq, args.bench, 100):
        run.save(3, q=sql_q.state_dict(), v=sql_v.state_dict())
    return sql_q, sql_v


# ---- Stage 4: dynamics score h ---------------------------------------------------------------------------------------
def train_dynamics_score(run: Run) -> tuple[nn.Module, nn.Module, Optional[torch.Tensor]]:
    """contrastive (eq. 5.4): binary NCE with target (s,a,s') positives and B-1 source next-state negatives, B x B
    logits from one matmul, 7000 steps; h = cos(phi(s,a), psi(s')). ot (§10, OTDF): the OT score c of every source row
    against the target rows, computed once (otdf.ot_scores). Returns phi, psi and the OT scores (None: contrastive)."""
    args, d, dev, B = run.args, run.d, run.dev, run.args.batch_size
    data, ds, da, Ns, Nt = d["data"], d["ds"], d["da"], d["n_src"], d["n_tgt"]
    phi, psi = mlp(ds + da, 64).to(dev), mlp(ds, 64).to(dev)
    if 4 not in run.stages:
        return phi, psi, None
    ck = run.checkpoint(4)
    if args.dynamics_score == "ot":
        if ck is not None:
            if ck["c_src"].shape != (Ns,):
                fail(f"stage4.pt holds OT scores of {ck['c_src'].shape[0]} source rows, but the source data has {Ns}")
            return phi, psi, ck["c_src"]
        rows = lambda x: torch.cat([x[:, : ds + da], split(x, ds, da)[3]], 1)  # [s, a, s']
        ot_stage = lambda src: otdf.ot_scores(rows(src), rows(data[Ns:]), args.seed)
        if run.bench:
            n = min(Ns, otdf.OT_CHUNK)  # one chunk per step: the stage takes about Ns / OT_CHUNK of them
            utils.bench_stage(f"stage 4 OT score of one {n}-row chunk", lambda i: ot_stage(data[:n])[:1], 2, 1, run.mm_rate)
            return phi, psi, None
        t0 = time.time()
        c_src = ot_stage(data[:Ns])
        print(f"[stage 4 OT score] {Ns} source rows against {min(Nt, otdf.OT_TARGET)} of {Nt} target rows in "
              f"{time.time() - t0:.1f} s", flush=True)
        run.save(4, c_src=c_src)
        utils.score_diagnostics(c_src, d, run.writer)
        return phi, psi, c_src
    if ck is not None:
        phi.load_state_dict(ck["phi"])
        psi.load_state_dict(ck["psi"])
        return phi, psi, None
    info_opt = run.adam([*phi.parameters(), *psi.parameters()])

    def info_step(i):
        x, neg = data[Ns + torch.randint(Nt, (B,), device=dev)], data[torch.randint(Ns, (B - 1,), device=dev)]
        enc = psi(torch.cat([split(x, ds, da)[3], split(neg, ds, da)[3]]))  # one psi pass: positive s', then negatives
        return optimize(info_opt, info_nce_loss(phi(x[:, : ds + da]), enc[:B], enc[B:]))[None]

    if run.train("stage 4 contrastive h", args.info_steps, info_step, ["losses/info_loss"], args.log_freq, args.bench, 100):
        run.save(4, phi=phi.state_dict(), psi=psi.state_dict())
    return phi, psi, None


# ---- Stage 5a: the filter (eq. 5.5) ----------------------------------------------------------------------------------
class SourceFilter(NamedTuple):
    """Keep the top n = max(1, min(B, floor(xi B))) of B source samples by f = lambda h + (1 - lambda) minmax(A);
    w = min(exp(h), 100) on kept source rows, 1 on the B target rows. With the OT score, h is the batch's c normalised
    as OTDF does (otdf.ot_batch_norm, §10). h and A of every source row are computed once (score_sources)."""

    h_src: torch.Tensor
    adv_src: torch.Tensor
    tradeoff: float
    n_keep: int
    ot: bool

    def scores(self, idx: torch.Tensor):
        """h (per-batch normalised for OT) and A of source rows idx [..., B]."""
        h = self.h_src[idx]
        return otdf.ot_batch_norm(h) if self.ot else h, self.adv_src[idx]


@torch.no_grad()
def score_sources(run: Run, z_traj, sql_q, sql_v, phi, psi, c_src: Optional[torch.Tensor], chunk: int = 65536):
    """h(s,a,s') (the OT score c: not yet normalised per batch) and A(s,a,z) = min(Q1, Q2)(s,a,z) - V(s,z) of every
    source row (A = 0 without stage 3). The scorers are frozen, so a row's scores never change in stage 5: computing
    them once (seconds) gives the numbers that scoring each batch would, up to float rounding."""
    d, t0 = run.d, time.time()
    data, ds, da = d["data"], d["ds"], d["da"]
    h_src, adv_src = [], []
    for idx in torch.arange(d["n_src"], device=run.dev).split(chunk):
        x = data[idx]
        h = c_src[idx] if c_src is not None else cosine_score(phi(x[:, : ds + da]), psi(split(x, ds, da)[3]))
        adv = h * 0
        if 3 in run.stages:
            q_min = sql_q(with_z(z_traj, d, x[:, : ds + da], idx)).min(0).values
            adv = (q_min - sql_v(with_z(z_traj, d, x[:, :ds], idx))).squeeze(-1)
        h_src.append(h)
        adv_src.append(adv)
    print(f"[stage 5] scored {d['n_src']} source rows (h, A) in {time.time() - t0:.1f} s", flush=True)
    return torch.cat(h_src), torch.cat(adv_src)


def make_filter(run: Run, z_traj, sql_q, sql_v, phi, psi, c_src: Optional[torch.Tensor]) -> SourceFilter:
    """Stage 5a: every source row's h and A (score_sources), or with --oracle the truth in their place; then the
    filter's accuracy against the truth, once, off the hot path (filter_accuracy)."""
    args, d = run.args, run.d
    h_src, adv_src = score_sources(run, z_traj, sql_q, sql_v, phi, psi, c_src)
    if args.oracle != "none":  # a diagnostic: the true gap's rank for h, and the behaviour label's rank for A
        h_src = truth.gap_score(d["true_gap"])
        adv_src = truth.quality_score(d) if args.oracle == "full" else adv_src
    filt = SourceFilter(h_src, adv_src, tradeoff(args), kept_count(args.batch_size, args.xi), c_src is not None)
    filter_accuracy(run, filt)
    return filt


def filter_accuracy(run: Run, filt: SourceFilter):
    """The filter against the ground truth of generated data (v2a_utils/filter_truth.py): h against each row's true
    dynamics gap, A against its behaviour label, and the rows it keeps beside those the oracles keep at the same xi.
    Logged as filter/accuracy/<metric> and kept for results.json (run.results)."""
    has_adv = 3 in run.stages or run.args.oracle == "full"

    def keep(idx, h_src, adv_src, is_oracle):  # eq. 5.5 on per-row scores (the oracle's h needs no OT normalisation)
        h = otdf.ot_batch_norm(h_src[idx]) if filt.ot and not is_oracle else h_src[idx]
        return select_kept(filter_scores(h, adv_src[idx], filt.tradeoff)[0], filt.n_keep)

    acc = truth.filter_accuracy(run.d, filt.h_src, filt.adv_src if has_adv else None, keep, run.args.batch_size,
                                run.args.seed)
    for tag, value in acc.items():
        if value is not None:
            run.writer.add_scalar(f"filter/accuracy/{tag}", value, 0)
    run.results["filter_accuracy"] = acc
    print(f"[stage 5a] filter accuracy: {truth.summary_line(acc)}", flush=True)


def next_batch(run: Run, filt: Optional[SourceFilter]):
    """Stage-5 batch D' (rows [s, a, r, s', d]: the kept source rows, then B target rows) and its Q-loss weights w
    (None: all 1). merged: all B source rows; target and bc: the target rows only. Drawn on the device, no host sync."""
    d, B, dev = run.d, run.args.batch_size, run.dev
    src_idx, tgt_idx = torch.randint(d["n_src"], (B,), device=dev), d["n_src"] + torch.randint(d["n_tgt"], (B,), device=dev)
    rows = d["stage5_rows"]  # normalised states, scaled rewards (utils.stage5_data)
    if not utils.has_source_rows(run.args):  # target, bc
        return rows[tgt_idx], None
    if filt is None:
        return rows[torch.cat([src_idx, tgt_idx])], None
    h, adv = filt.scores(src_idx)
    keep = select_kept(filter_scores(h, adv, filt.tradeoff)[0], filt.n_keep)
    return rows[torch.cat([src_idx[keep], tgt_idx])], torch.cat([source_weight(h[keep]), torch.ones_like(h)])


@torch.no_grad()
def filter_diagnostics(run: Run, filt: SourceFilter, step: int, gen: torch.Generator, chunks: int = 16):
    """The filter on `chunks` fresh source batches, off the hot path (frozen scorers: same distribution as the
    training batches): kept-row means, kept fraction per domain and quality, A per domain-quality (Fig. 2(b))."""
    d, writer = run.d, run.writer
    idx = torch.randint(d["n_src"], (chunks, run.args.batch_size), device=run.dev, generator=gen)
    h, adv = filt.scores(idx)
    f, adv_norm = filter_scores(h, adv, filt.tradeoff)
    keep = select_kept(f, filt.n_keep)
    for tag, v in (("h_mean", h), ("adv_norm_mean", adv_norm), ("weight_mean", source_weight(h))):
        writer.add_scalar(f"filter/{tag}", v.gather(1, keep).mean().item(), step)
    kept, tid = torch.zeros_like(h).scatter_(1, keep, 1.0).cpu(), d["traj_id"][idx].cpu()
    dom, qual, adv = d["dom"].cpu()[tid], d["qual"].cpu()[tid], adv.cpu()
    for lab, names in ((dom, d["dom_names"]), (qual, d["qual_names"])):
        for k in [k for k in range(len(names)) if (lab == k).any()]:
            writer.add_scalar(f"filter/kept_frac/{names[k]}", kept[lab == k].mean().item(), step)
    for i, j in [(i, j) for i in range(len(d["dom_names"])) for j in range(len(d["qual_names"]))]:
        if 3 in run.stages and (m := (dom == i) & (qual == j)).any():
            writer.add_histogram(f"filter/adv/{d['dom_names'][i]}-{d['qual_names'][j]}", adv[m], step)


# >>> backbone: TD3+BC
def make_learner(run: Run, batch: Callable) -> utils.Learner:
    """Stage 5b: TD3+BC on D' (docs/specification.md §9): twin critics, TD loss weighted by w, targets from the target
    actor with smoothing noise; every policy_freq steps the actor (unweighted, Q1 only) and Polyak on actor and
    critics. `batch()` draws (D', w)."""
    args, dev, ds, da = run.args, run.dev, run.d["ds"], run.d["da"]
    actor, qf = nn.Sequential(mlp(ds, da), nn.Tanh()).to(dev), EnsembleMLP(2, ds + da, 1).to(dev)
    actor_t, qf_t = copy.deepcopy(actor).requires_grad_(False), copy.deepcopy(qf).requires_grad_(False)
    opts = qf_opt, actor_opt = [utils.init_adam_state(run.adam(net.parameters())) for net in (qf, actor)]
    actor_loss = torch.zeros((), device=dev)  # the last actor loss, logged on the steps without an actor update
    online, target = [*qf.parameters(), *actor.parameters()], [*qf_t.parameters(), *actor_t.parameters()]
    filtered = args.variant in PUBLISHED_TRADEOFF  # batches carry the filter's TD weights w

    def critic_loss(qf_params: dict, x: torch.Tensor, w: Optional[torch.Tensor]):
        s, a, r, s2, done = split(x, ds, da)  # states normalised in the data already (utils.stage5_data)
        with torch.no_grad():
            a2 = smoothed_target_action(actor_t(s2), args.policy_noise, args.noise_clip)
            y = r + args.gamma * (1 - done) * qf_t(torch.cat([s2, a2], -1)).min(0).values.squeeze(-1)
        q = functional_call(qf, qf_params, torch.cat([s, a], -1)).squeeze(-1)
        return td_loss(q, y, w), (s, a, q.detach().min(0).values)

    def actor_loss_(actor_params: dict, s: torch.Tensor, a: torch.Tensor):
        pi = functional_call(actor, actor_params, s)
        loss = td3bc_actor_loss(qf(torch.cat([s, pi], -1), member=0)[0].squeeze(-1), pi, a, args.alpha)
        return loss, loss.detach()  # a tensor aux: with None, torch.func.grad_and_value breaks the compiled graph

    @torch.no_grad()  # utils.grad_and_value computes the gradients; nothing else needs an autograd graph
    def update(actor_step: bool):
        """One TD3+BC step as one function (compiled whole with --compile, one graph per value of actor_step):
        the critics; with actor_step, the actor on the updated critics and Polyak on both."""
        x, w = batch()
        # In plain PyTorch each grad_and_value + adam_step_ pair is `loss.backward(); opt.step(); opt.zero_grad()`:
        # grad_and_value returns the gradients (and the loss) instead of filling .grad, adam_step_ is Adam's step on
        # them, and _foreach_lerp_ is the Polyak average target <- (1 - tau) target + tau online.
        qf_grads, (qf_loss, (s, a, q_min)) = utils.grad_and_value(critic_loss, utils.params(qf), x, w)
        qf_norm = stability.grad_norm(qf_grads)  # logged: a divergence's trace
        utils.adam_step_(qf_opt, qf_grads)
        if actor_step:
            actor_grads, (_, loss) = utils.grad_and_value(actor_loss_, utils.params(actor), s, a)
            utils.adam_step_(actor_opt, actor_grads)
            actor_loss.copy_(loss)
            torch._foreach_lerp_(target, online, args.tau)
        value_means = utils.batch_value_means((q_min,), args)
        w_range = [w.max(), w.min()] if filtered else []
        return torch.stack([qf_loss, actor_loss, *value_means, qf_norm, *w_range])

    def bc_loss(actor_params: dict, x: torch.Tensor):
        loss = F.mse_loss(functional_call(actor, actor_params, x[:, :ds]), x[:, ds: ds + da])  # TD3+BC's term alone
        return loss, loss.detach()

    @torch.no_grad()
    def bc_update(actor_step: bool):
        """--variant bc: the actor's regression term alone, on target rows, every step (alpha = 0, no critic)."""
        x, _ = batch()
        actor_grads, (_, loss) = utils.grad_and_value(bc_loss, utils.params(actor), x)
        utils.adam_step_(actor_opt, actor_grads)
        return loss[None]

    update_fn = utils.compiled(bc_update if args.variant == "bc" else update, args, dev, opts, static=(actor_loss,))

    def train_step(i: int):
        return update_fn(i % args.policy_freq == 0)

    def eval_policy():  # the deterministic actor, a CPU copy, on the observation normalised as the data
        net, norm = copy.deepcopy(actor).cpu(), utils.normalized_observation(run.d["stage5_stats"])
        return lambda obs: net(norm(obs))

    if args.variant == "bc":
        return utils.Learner(dict(actor=actor), [actor_opt], [], ["losses/actor_loss"], train_step, eval_policy)
    return utils.Learner(dict(actor=actor, actor_target=actor_t, qf=qf, qf_target=qf_t), opts, [],
                         ["losses/qf_loss", "losses/actor_loss", *utils.value_tags(args, ("q",)), "charts/grad_norm_qf",
                          *(["charts/td_weight_max", "charts/td_weight_min"] if filtered else [])], train_step, eval_policy,
                         q_values=lambda x: qf(x[:, : ds + da]).min(0).values.squeeze(-1))
# <<< backbone


DESCRIPTION = (
    "V2A cross-domain offline RL with the TD3+BC backbone, end to end in one process: TC-ELBO modality encoder, "
    "z-relabelling, modality-aware advantage, contrastive dynamics score, value-and-dynamics filter, filtered TD3+BC, "
    "evaluation in the target env; the baselines dvdf, igdf, merged and target via --variant, and OTDF's optimal-transport "
    "dynamics score instead of the contrastive one via --dynamics-score ot (igdf: OTDF, dvdf: DVDF-OTDF, v2a: V2A-OTDF; "
    "about 6 min on the default data). Example: python "
    "v2a_td3bc.py --env-id Hopper-v4 --variant v2a. Supported env ids: " + ", ".join(utils.SUPPORTED_ENV_IDS) + ". A default "
    "run first generates its datasets with data_gen.py if they are missing (1M source transitions, 100k target), "
    "then takes about 4.5 hours on one core of a 2-core CPU (100k TC-ELBO iterations about 3 h, " + STAGE5_TIME +
    "). A reduced budget, about 22 min there: --repr-steps 5000 --sql-steps 30000 --total-steps 100000. Runs go to "
    "runs/<env>__<script>__<variant>__<seed>__<time>/ (TensorBoard, checkpoints, results.json); docs/v2a_td3bc.md.")


def setup(args: Args) -> Run:
    """Every check first (flags, datasets, the checkpoints to load), then the run directory and its logging."""
    torch.set_flush_denormal(True)  # subnormal floats take a slow path on x86 CPUs: they triple the GRU's cost
    utils.validate_args(args, VARIANT_STAGES, PUBLISHED_TRADEOFF, backbone_errors(args))
    torch.set_num_threads(args.threads)  # before anything is compiled: the kernels take their thread count from it
    if args.resume:
        utils.check_resume(args, SCRIPT)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    dev = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    if args.cuda and dev.type == "cpu":
        print("CUDA not available: running on CPU", flush=True)
    d, stages = utils.load_data(args, dev), run_stages(args)
    d["stage5_rows"], d["stage5_stats"] = utils.stage5_data(d, args.normalize_states, args.reward_scale)
    keys = utils.stage_keys(args, d["records"], stages, SCRIPT, STAGE_CONSTANTS)
    return utils.start_run(args, SCRIPT, d, dev, stages, keys, row_name(args),
                           dict(resolved_tradeoff=tradeoff(args), kept_per_step=kept_count(args.batch_size, args.xi),
                                target_data_normalized_score=utils.data_level(d), stage5_data=d["stage5_stats"]),
                           crop_steps=REPR_BATCH * d["traj_len"].clamp(max=REPR_CROP).float().mean().item())


def main(args: Args):
    run = setup(args)
    encoder = train_encoder(run)  # stage 1 (v2a)
    z_traj = relabel_stage(run, encoder)  # stage 2 (v2a)
    sql_q, sql_v = train_advantage(run, z_traj)  # stage 3 (v2a, dvdf)
    phi, psi, c_src = train_dynamics_score(run)  # stage 4 (v2a, dvdf, igdf)
    for net in (sql_q, sql_v, phi, psi):  # frozen scorers: no gradient reaches them in stage 5
        net.requires_grad_(False)
    filt, name, diagnostics = None, f"{BACKBONE} {row_name(args)}", None
    if args.variant in PUBLISHED_TRADEOFF:  # stage 5a (filtered variants)
        filt = make_filter(run, z_traj, sql_q, sql_v, phi, psi, c_src)
        name += f" lambda {filt.tradeoff} xi {args.xi} keep {filt.n_keep}/{args.batch_size}"
        diagnostics = functools.partial(filter_diagnostics, run, filt)
        if args.filter_only:  # stages 1-4 and the filter's accuracy, no policy
            return utils.finish_filter_only(run)
    learner = make_learner(run, lambda: next_batch(run, filt))  # stage 5b
    utils.train_policy(run, learner, name, diagnostics)  # stage 5: --total-steps updates, evaluations, checkpoints
    run.writer.close()


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # a scheduler's stop: as Ctrl-C, not a silent exit 143
    try:
        main(utils.cli(Args, DESCRIPTION))
    except (KeyboardInterrupt, OSError) as e:  # a stop or a full disk: one line, naming the command that continues the run
        utils.exit_in_one_line(e)
