# V2A with a TD3+BC backbone, and its ablations DVDF, IGDF, merged-data TD3+BC and target-only TD3+BC, in one file.
# paper: Qiao et al., "Unifying Value Alignment and Assignment in Cross-Domain Offline RL with Heterogeneous Datasets",
# ICML 2026, arXiv 2605.24862.  spec: docs/specification.md (TD3+BC: §9).  docs: docs/v2a_td3bc.md
# usage: python v2a_td3bc.py --env-id Hopper-v4 [--variant v2a|dvdf|igdf|merged|target]
import copy
import functools
import glob
import json
import math
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from typing import Literal, Optional

import minari
import numpy as np
import torch
import torch._inductor.config
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.flop_counter
import tyro
from minari.storage import get_dataset_path
from torch.utils.tensorboard import SummaryWriter

SCRIPT = os.path.basename(__file__)
SUPPORTED_ENV_IDS = [f"{robot}-{v}" for robot in ("Hopper", "Walker2d", "HalfCheetah", "Ant") for v in ("v4", "v5")]
DEFAULT_SOURCES = {  # the robot's default source mixture, as data_gen.py
    "Hopper": "torso-hard:random,gravity-0.5:expert,legjnt-hard:medium",
    "Walker2d": "torso-hard:random,gravity-0.5:expert,thighjnt-hard:medium",
    "HalfCheetah": "torso-hard:random,gravity-0.5:expert,thighjnt-hard:medium",
    "Ant": "gravity-0.1:random,alllegs-hard:expert,hipjnt-medium:medium",
}
QUALITIES = ("random", "medium", "expert")
MAX_DATASET_TRANSITIONS = 10_000_000  # per dataset, as data_gen.py
VARIANT_STAGES = {"v2a": (1, 2, 3, 4), "dvdf": (3, 4), "igdf": (4,), "merged": (), "target": ()}
PUBLISHED_TRADEOFF = {"v2a": 0.6, "dvdf": 0.7, "igdf": 1.0}  # lambda: docs/specification.md §7.1, §8 (igdf: h only)
# the paper's six filtered rows: (--variant, --dynamics-score) -> name (run directories, results.json); §8, §10
ROW_NAMES = {("igdf", "contrastive"): "igdf", ("dvdf", "contrastive"): "dvdf", ("v2a", "contrastive"): "v2a",
             ("igdf", "ot"): "otdf", ("dvdf", "ot"): "dvdf-otdf", ("v2a", "ot"): "v2a-otdf"}
# OT score (OTDF, docs/specification.md §10): Sinkhorn threshold and iteration cap as OTDF, epsilon = OT_EPS x mean of the
# max-scaled cost (ott-jax 0.4.5's default, which OTDF uses), OTDF's 10,000-row source chunks, a 5,000-row target subsample
OT_THRESHOLD, OT_ITERS, OT_EPS, OT_CHUNK, OT_TARGET = 1e-9, 100, 0.05, 10_000, 5_000
NEW_FLAG_DEFAULTS = {"dynamics_score": "contrastive"}  # flags added after runs were made: absent reads as this default
REPR_BATCH, REPR_CROP, KL_BETA, GRAD_CLIP, SQL_BATCH = 16, 200, 1e-3, 10.0, 256  # docs/specification.md §7.1


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
    """the source mixture, `domain:quality[:weight]` entries (same grammar as data_gen.py); None: the robot's default
    (Hopper: torso-hard:random,gravity-0.5:expert,legjnt-hard:medium; see DEFAULT_SOURCES)"""
    source_size: int = 1_000_000
    """total transitions of the source mixture"""
    target_size: int = 100_000
    """transitions of the target dataset"""
    generate: bool = True
    """run data_gen.py when the datasets are missing (`--no-generate`: stop with an error instead)"""
    variant: Literal["v2a", "dvdf", "igdf", "merged", "target"] = "v2a"
    """v2a: h + A(s,a,z); dvdf: h + A(s,a); igdf: h only; merged: TD3+BC on source+target; target: TD3+BC on target"""
    dynamics_score: Literal["contrastive", "ot"] = "contrastive"
    """the dynamics score h of v2a, dvdf and igdf: contrastive (IGDF's, stage 4 trains it) or ot (OTDF's optimal-
    transport score, stage 4 computes it): --variant igdf --dynamics-score ot is OTDF, dvdf: DVDF-OTDF, v2a: V2A-OTDF"""
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
    """episodes per evaluation"""
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
    """discount"""
    tau: float = 0.005
    """Polyak rate of the target Q networks"""
    resume: Optional[str] = None
    """`runs/<name>`: continue that run (finished stages are loaded, stage 5 continues from its checkpoint) with the
    run's own flags; only --total-steps may grow"""
    reuse_stages: Optional[str] = None
    """`runs/<name>`: load stages 1-4 of that run and train stage 5 afresh (lambda / xi sweeps); the stages must
    come from the same datasets, seed, variant stages and stage flags (either script)"""
    bf16: bool = False
    """opt-in: bf16 autocast of the TC-ELBO decoder and of the stage-5 losses (changes the numerics; docs give its
    measured speed and effect)"""
    compile: bool = True
    """compile the stage-5 update with torch.compile (on CUDA also as a CUDA graph); about a minute of cold compile
    on a CPU, then about twice the eager rate. `--no-compile` runs the eager reference"""
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
    """feed the stage-5 networks states normalised with the target data's mean and std (eps 1e-3)"""
    # <<< backbone


def fail(msg: str):
    raise SystemExit(f"v2a_td3bc.py: error: {msg}")


def one_line(e: Exception) -> str:
    return " ".join(f"{type(e).__name__}: {e}".split())[:300]


def parse_source(spec: str) -> list[tuple[str, str, float]]:
    """`domain:quality[:weight]` entries -> [(domain, quality, weight)]; the grammar of data_gen.py (weight: a finite
    float > 0, as float() reads it)."""
    entries = []
    for item in filter(None, (x.strip() for x in spec.split(","))):
        parts = item.split(":")
        if len(parts) not in (2, 3) or parts[1] not in QUALITIES:
            fail(f"malformed source entry {item!r}: expected domain:quality[:weight] with quality in "
                 f"{'|'.join(QUALITIES)}, e.g. 'gravity-0.5:random,torso-hard:medium'")
        try:
            weight = float(parts[2]) if len(parts) == 3 else 1.0
        except ValueError:
            weight = math.nan
        if not 0 < weight < math.inf:
            fail(f"malformed source entry {item!r}: the weight must be a finite number > 0")
        entries.append((parts[0], parts[1], weight))
    return entries or fail("empty source spec: give at least one domain:quality entry")


def size_tag(n: int) -> str:
    return f"{n // 1000}k" if n % 1000 == 0 else str(n)  # exact: two sizes never share a dataset id


def dataset_ids(env_id: str, source: str, source_size: int, target_size: int) -> tuple[list[str], str]:
    entries = parse_source(source)
    total = sum(w for _, _, w in entries)
    ns = f"v2a/{env_id.lower()}"
    src = [f"{ns}/source/{d.replace('.', 'p').replace('-', '')}-{q}-{size_tag(int(source_size * w / total))}-v0"
           for d, q, w in entries]
    return src, f"{ns}/target/medium-{size_tag(target_size)}-v0"


def expected_generation(args: Args) -> dict[str, dict]:
    """Dataset id -> the generation record data_gen.py stores in it, as the flags imply it (source ids first, the
    target last). The data seed is not a flag here: it is recorded in args.json, not compared."""
    src_ids, tgt_id = dataset_ids(args.env_id, args.source, args.source_size, args.target_size)
    entries = parse_source(args.source)
    total = sum(w for _, _, w in entries)
    rec = lambda dom, q, n, mix: dict(env_id=args.env_id, domain=dom, quality=q, transitions=n, mixture=mix)
    return {**{i: rec(d, q, int(args.source_size * w / total), args.source) for i, (d, q, w) in zip(src_ids, entries)},
            tgt_id: rec("nominal", "medium", args.target_size, None)}


def validate_args(args: Args):
    """Every flag, checked before anything runs (data generation included); resolves the default --source."""
    if args.env_id not in SUPPORTED_ENV_IDS:
        fail(f"unknown --env-id {args.env_id!r}; supported: {', '.join(SUPPORTED_ENV_IDS)}")
    args.source = DEFAULT_SOURCES[args.env_id.rpartition("-")[0]] if args.source is None else args.source
    for ds_id, rec in expected_generation(args).items():
        if not 1 <= rec["transitions"] <= MAX_DATASET_TRANSITIONS:
            fail(f"{ds_id} ({rec['domain']}:{rec['quality']}) would get {rec['transitions']:,} transitions; a dataset "
                 f"holds 1 to {MAX_DATASET_TRANSITIONS:,} (data_gen.py's cap): change --source-size, --target-size or "
                 f"the weights")
    stages, bench, runs = VARIANT_STAGES[args.variant], args.bench > 0, [args.resume, args.reuse_stages]
    budgets = {1: ("repr-steps", args.repr_steps), 3: ("sql-steps", args.sql_steps), 4: ("info-steps", args.info_steps)}
    trained = [k for k in stages if k in budgets and (k != 4 or args.dynamics_score == "contrastive")]  # ot: no steps
    checks = [
        (not 0 <= args.seed < 2**31, f"--seed must lie in [0, 2^31), got {args.seed}"),
        (not 0 < args.xi <= 1 or (args.tradeoff is not None and not 0 <= args.tradeoff <= 1),
         f"--xi must lie in (0, 1] and --tradeoff in [0, 1]; got xi {args.xi}, tradeoff {args.tradeoff}"),
        (args.tradeoff is not None and args.variant not in ("v2a", "dvdf"),
         f"--tradeoff applies to the v2a and dvdf variants only, not to {args.variant}"),
        (args.dynamics_score != "contrastive" and args.variant not in PUBLISHED_TRADEOFF,
         f"--dynamics-score applies to the filtered variants v2a, dvdf and igdf only, not to {args.variant}"),
        *[(n <= 0 and not bench, f"--{flag} must be > 0 for the {args.variant} variant, got {n}")
          for flag, n in [budgets[k] for k in trained] + [("total-steps", args.total_steps)]],
        *[(n < 0, f"--{flag} must be >= 0, got {n}") for flag, n in budgets.values()],
        (min(args.eval_freq, args.eval_episodes, args.log_freq, args.batch_size, args.z_dim) <= 0,
         "--eval-freq, --eval-episodes, --log-freq, --batch-size and --z-dim must be > 0"),
        (not 0 < args.learning_rate < math.inf, f"--learning-rate must be finite and > 0, got {args.learning_rate}"),
        (not 0 < args.sql_alpha < math.inf, f"--sql-alpha must be finite and > 0, got {args.sql_alpha}"),
        (not 0 <= args.gamma <= 1 or not 0 < args.tau <= 1,
         f"--gamma must lie in [0, 1] and --tau in (0, 1]; got gamma {args.gamma}, tau {args.tau}"),
        *[(True, msg) for msg in backbone_errors(args)],
        (args.bench < 0 or (bench and any(runs)), "--bench takes a number >= 0 and excludes --resume/--reuse-stages"),
        (all(runs), "--resume and --reuse-stages exclude each other"),
        *[(not os.path.isdir(run), f"{run} is not a run directory") for run in filter(None, runs)],
    ]
    for bad, msg in checks:
        if bad:
            fail(msg)


# ---- Run integrity: --resume and --reuse-stages load only what the current flags would compute ----------------------
RESUME_FREE = ("exp_name", "track", "wandb_project_name", "wandb_entity", "generate", "log_freq", "resume",
               "reuse_stages", "bench", "compile", "total_steps")  # flags that do not change results (--total-steps may grow)


def differences(old, new, prefix: str = "") -> list[str]:
    """'path old (now new)' for every leaf where two nested dicts differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for k in dict.fromkeys([*old, *new])
                for d in differences(old.get(k, "<absent>"), new.get(k, "<absent>"), f"{prefix}{k}.")]
    short = lambda x: "{...}" if isinstance(x, dict) else x if x == "<absent>" else repr(x)[:80]
    return [] if old == new else [f"{prefix[:-1]} {short(old)} (now {short(new)})"]


def check_resume(args: Args):
    """--resume: the run must be one of this script's, made with the same flags apart from RESUME_FREE and a larger
    --total-steps; it loads its stages 1-4 from where it loaded them (its --reuse-stages)."""
    path = os.path.join(args.resume, "args.json")
    try:
        with open(path) as fh:
            old = json.load(fh)
    except (OSError, ValueError) as e:
        fail(f"--resume {args.resume}: cannot read {path} ({one_line(e)}); give a run directory made by {SCRIPT}")
    script = old.get("script", f"{old.get('exp_name')}.py")
    if script != SCRIPT:
        fail(f"--resume {args.resume}: that run was made by {script}; resume it with python {script} --resume ...")
    diff = [d for k, v in json.loads(json.dumps(vars(args))).items() if k not in RESUME_FREE
            for d in differences(old.get(k, NEW_FLAG_DEFAULTS.get(k, "<absent>")), v, f"--{k.replace('_', '-')}.")]
    if args.total_steps < old.get("total_steps", 0):
        diff.append(f"--total-steps {old['total_steps']} (now {args.total_steps}; it may only grow)")
    if diff:
        fail(f"--resume {args.resume} was made with other flags: {', '.join(diff)}; pass that run's flags")
    args.reuse_stages = old.get("reuse_stages")
    if args.reuse_stages and not os.path.isdir(args.reuse_stages):
        fail(f"--resume {args.resume} loads its stages 1-4 from {args.reuse_stages}, which is not a directory any more")


def stage_keys(args: Args, records: dict, stages) -> dict:
    """Stage -> everything that determined its result: stored in its checkpoint, compared when it is loaded. A key
    holds those of the stages trained before it in the same run (they advance the RNG; stage 2's z feeds stage 3).
    Keys of stages 1-4 hold nothing script-specific: both scripts share those stages."""
    src = dict(list(records.items())[:-1])  # the target dataset is the last
    own = {1: dict(data=src, repr_steps=args.repr_steps, z_dim=args.z_dim, lr=args.learning_rate, bf16=args.bf16,
                   constants=[REPR_BATCH, REPR_CROP, KL_BETA, GRAD_CLIP]),
           2: {},
           3: dict(data=src, sql_steps=args.sql_steps, sql_alpha=args.sql_alpha, gamma=args.gamma, tau=args.tau,
                   lr=args.learning_rate, constants=[SQL_BATCH]),
           4: dict(data=records, info_steps=args.info_steps, batch_size=args.batch_size, lr=args.learning_rate)
           if args.dynamics_score == "contrastive" else  # the OT score: a function of the data, the seed and these
           dict(data=records, score="ot", constants=[OT_THRESHOLD, OT_ITERS, OT_EPS, OT_CHUNK, OT_TARGET])}
    keys, chain = {}, {"seed": args.seed}
    for k in stages:
        keys[k] = chain = {**chain, f"stage{k}": own[k]}
    flags = {k: v for k, v in vars(args).items()  # a newer flag at its default is left out: older keys stay valid
             if k not in RESUME_FREE and not (k in NEW_FLAG_DEFAULTS and NEW_FLAG_DEFAULTS[k] == v)}
    keys[5] = {**chain, "stage5": dict(data=records, script=SCRIPT, flags=flags)}
    return {k: json.loads(json.dumps(key)) for k, key in keys.items()}  # as stored: lists, not tuples


def read_checkpoint(path: str, key: dict, dev: torch.device, hint: str) -> dict:
    try:
        ck = torch.load(path, map_location=dev, weights_only=False)
    except Exception as e:
        fail(f"{path} cannot be read ({one_line(e)}): it is truncated or corrupt; delete it to train its stage again")
    if not isinstance(ck, dict) or "key" not in ck:
        fail(f"{path} holds no stage key (an older version of this script wrote it): train its stage again")
    if diff := differences(ck["key"], key):
        fail(f"{path} was trained with other settings: {'; '.join(diff[:4])}{' ...' if len(diff) > 4 else ''}; {hint}")
    return ck


def load_checkpoints(args: Args, stages, keys: dict, dev: torch.device) -> dict:
    """Stage -> (path, checkpoint) of what this run continues from, each read and checked against its key before
    anything is written: stages 1-5 of --resume (stages 1-4 also from the run it reused), stages 1-4 of --reuse-stages
    (all that the variant needs)."""
    cks, hints = {}, {args.resume: "resume with the datasets and flags it was made with (only --total-steps may grow)",
                      args.reuse_stages: "reuse a run of the same datasets, seed and stage settings"}
    find = lambda folder, k: folder and os.path.exists(os.path.join(folder, f"stage{k}.pt"))
    if args.reuse_stages and not args.resume and (absent := [k for k in stages if not find(args.reuse_stages, k)]):
        fail(f"--reuse-stages {args.reuse_stages} has no stage{absent[0]}.pt, which the {args.variant} variant needs")
    for k in (*stages, 5):
        if folder := next((f for f in (args.resume, args.reuse_stages if k <= 4 else None) if find(f, k)), None):
            path = os.path.join(folder, f"stage{k}.pt")
            cks[k] = path, read_checkpoint(path, keys[k], dev, hints[folder])
    return cks


STAGE_TAGS = ((0, "hyperparameters"), (1, "repr/rec_loss"), (1, "repr/kl"), (2, "repr/domain_probe_acc"),
              (3, "losses/sql_"), (4, "losses/info_loss"), (4, "dynamics/"))  # tag prefix -> its stage; others: 5


def cut_events(run_dir: str, keep: dict):
    """--resume: drop from the run's TensorBoard event files what this process logs again (steps after stage 5's
    checkpoint, every step of a stage that runs again, the hyperparameter text), so each (tag, step) is logged once."""
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.summary.writer.record_writer import RecordWriter
    stage = lambda tag: next((k for k, prefix in STAGE_TAGS if tag.startswith(prefix)), 5)
    for path in glob.glob(os.path.join(run_dir, "events.out.tfevents.*")):
        records = list(RawEventFileLoader(path).Load())
        kept = [r for r, e in ((r, Event.FromString(r)) for r in records)
                if all(e.step <= keep[stage(v.tag)] for v in e.summary.value)]
        if len(kept) < len(records):
            with open(path + ".tmp", "wb") as fh:
                for r in kept:
                    RecordWriter(fh).write(r)
            os.replace(path + ".tmp", path)


# ---- Networks -------------------------------------------------------------------------------------------------------
def mlp(inp: int, out: int, hidden: int = 256) -> nn.Sequential:
    return nn.Sequential(nn.Linear(inp, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, out))


class EnsembleMLP(nn.Module):
    """E independent 2x256 ReLU MLPs as one batched matmul per layer (weights [E, in, out], torch.baddbmm): the twin
    critics (E = 2) and the TC-ELBO decoder ensemble (E = 3, rlkit init: biases 0.1, last layer U(+-3e-3))."""

    def __init__(self, ensemble: int, inp: int, out: int, hidden: int = 256, decoder_init: bool = False):
        super().__init__()
        dims = [inp, hidden, hidden, out]
        self.w, self.b = nn.ParameterList(), nn.ParameterList()
        for i, (m, n) in enumerate(zip(dims[:-1], dims[1:])):
            last = i == len(dims) - 2
            bound = 3e-3 if decoder_init and last else m**-0.5  # fan-in uniform otherwise, as nn.Linear
            self.w.append(nn.Parameter(torch.empty(ensemble, m, n).uniform_(-bound, bound)))
            bias = torch.empty(ensemble, 1, n).uniform_(-bound, bound)
            self.b.append(nn.Parameter(bias.fill_(0.1) if decoder_init and not last else bias))

    def forward(self, x: torch.Tensor, z: Optional[torch.Tensor] = None, group: Optional[torch.Tensor] = None):
        """x [N, in] (shared by all members) or [E, N, in] -> [E, N, out]. With z [G, dz] and group [N], the input of
        row i is [x_i, z_group[i]]: z's share of the first layer is computed once per z, not per row (the same
        function, fewer FLOPs: the TC-ELBO decoder sees one z per 200-step window)."""
        E = self.w[0].shape[0]
        x = x.expand(E, *x.shape) if x.dim() == 2 else x
        for i, (w, b) in enumerate(zip(self.w, self.b)):
            if i == 0 and z is not None:
                nx = x.shape[-1]
                x = torch.baddbmm(b, x, w[:, :nx]) + torch.matmul(z, w[:, nx:])[:, group]
            else:
                x = torch.baddbmm(b, x, w)
            x = F.relu(x) if i < len(self.w) - 1 else x
        return x


class TrajectoryEncoder(nn.Module):
    """q(z | tau): GRU over x_t = [s_t, a_t, s_{t+1} - s_t]; Gaussian heads on the output at the last valid step."""

    def __init__(self, inp: int, z_dim: int, hidden: int = 256):
        super().__init__()
        self.gru = nn.GRU(inp, hidden, batch_first=True)
        self.mu, self.log_std = nn.Linear(hidden, z_dim), nn.Linear(hidden, z_dim)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor):  # x [B, T, inp], lengths [B] >= 1
        # packed: the GRU runs over the valid steps of each sequence only, not over the padding after them (a GRU is
        # causal, so the state at the last valid step is the same); h_n is that state
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        last = self.gru(packed)[1][0]
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


STAGE5_TIME = "1M filtered-TD3+BC steps about 1.1 h"  # for --help
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


def ot_plan(src: torch.Tensor, tgt: torch.Tensor, iters: int = OT_ITERS):
    """OTDF's OT problem (docs/specification.md §10) between source and target rows [s, a, s'], uniform weights: cosine
    cost C = 1 - cos divided by its maximum, entropic regularisation epsilon = OT_EPS x mean C, POT's Sinkhorn for at
    most `iters` iterations or until the marginal error is below OT_THRESHOLD. Returns (P, C). POT's last update is
    that of the rows: every row of P sums to 1 / rows, the columns to about 1 / columns. Float32 kernel iterations
    first (twice as fast; on Hopper the same scores to 2e-6); where exp(-C / epsilon) leaves float32's range, float64,
    then POT's log-domain solver (slow, never underflows)."""
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


def kept_count(batch: int, xi: float) -> int:
    return max(1, min(batch, math.floor(xi * batch)))


def select_kept(f: torch.Tensor, n: int) -> torch.Tensor:
    """Eq. 5.5: indices of the n highest scores along the last dim (fixed shape, no host sync)."""
    return torch.topk(f, n, dim=-1).indices


def source_weight(h: torch.Tensor) -> torch.Tensor:
    """Eq. 5.5: Q-loss weight of a kept source sample, min(exp(h), 100)."""
    return h.exp().clamp(max=100.0)


# ---- Data: Minari episodes -> one device matrix of rows [s, a, r, s', d], source rows first, then target rows ----
def split(x: torch.Tensor, ds: int, da: int):
    return x[..., :ds], x[..., ds : ds + da], x[..., ds + da], x[..., ds + da + 1 : 2 * ds + da + 1], x[..., -1]


def flatten(ds, max_len: int = 1000):
    """Episodes -> rows [s, a, r, s', terminated] and trajectory lengths (episodes cut every max_len steps)."""
    rows, lens = [], []
    for ep in ds.iterate_episodes():
        o, T = ep.observations, len(ep.actions)
        rows.append(np.concatenate([o[:-1], ep.actions, ep.rewards[:, None], o[1:], ep.terminations[:, None]], 1))
        lens.append([min(max_len, T - k) for k in range(0, T, max_len)])
    return np.concatenate(rows).astype(np.float32), lens


def regenerate_hint(args: Args) -> str:
    return (f"regenerate it with python data_gen.py --env-id {args.env_id} --source '{args.source}' --source-size "
            f"{args.source_size} --target-size {args.target_size} --overwrite, or set MINARI_DATASETS_PATH to another "
            f"folder")


def open_dataset(ds_id: str, expected: dict, args: Args):
    """Loads one dataset and checks its stored generation record against what the flags imply."""
    try:
        ds = minari.load_dataset(ds_id)
        record = json.loads(ds.storage.metadata.get("v2a_generation", "null"))
    except Exception as e:
        fail(f"dataset {ds_id} cannot be loaded ({one_line(e)}); {regenerate_hint(args)}")
    if not isinstance(record, dict):
        fail(f"dataset {ds_id} has no generation record (data_gen.py did not make it); {regenerate_hint(args)}")
    if diff := [f"{k} {record.get(k)!r} (the flags imply {v!r})" for k, v in expected.items() if record.get(k) != v]:
        fail(f"dataset {ds_id} was generated with other arguments: {', '.join(diff)}; {regenerate_hint(args)}")
    return ds, record


def run_data_gen(args: Args, missing: list[str]):
    """data_gen.py as a child in its own process group, stopped with it when this process ends early (SIGINT, SIGTERM,
    an error); the child's one-line error becomes this script's."""
    print(f"datasets missing ({', '.join(missing)}): running data_gen.py", flush=True)
    cmd = [sys.executable, "data_gen.py", "--env-id", args.env_id, "--source", args.source,
           "--source-size", str(args.source_size), "--target-size", str(args.target_size)]
    def stop(signum, _frame):
        fail(f"{signal.Signals(signum).name} while data_gen.py was generating the datasets: stopped it, trained nothing")
    handlers, child = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}, None
    try:
        child = subprocess.Popen(cmd, cwd=os.path.dirname(os.path.abspath(__file__)), stderr=subprocess.PIPE, text=True,
                                 start_new_session=True)  # its own group: a terminal's Ctrl-C reaches this process only
        err = child.communicate()[1]
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        if child is not None and child.poll() is None:
            os.killpg(child.pid, signal.SIGINT)  # data_gen.py then removes its staging folder
            try:
                child.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(child.pid, signal.SIGKILL)
    if child.returncode != 0:
        errors = [line for line in err.splitlines() if line.startswith("data_gen.py: error: ")]
        sys.stderr.write("" if errors else err)  # no one-line error: a crash, whose traceback the user needs
        fail(errors[-1] if errors else f"data_gen.py exited with status {child.returncode}")


def load_data(args: Args, device: torch.device) -> dict:
    """Checks the datasets the flags name (runs data_gen.py for missing ones), checks the spaces, and moves everything
    to the device once."""
    expected = expected_generation(args)
    (*src_ids, tgt_id), present = list(expected), lambda i: os.path.exists(os.path.join(get_dataset_path(i), "data"))
    opened = {i: open_dataset(i, expected[i], args) for i in expected if present(i)}  # before any generation
    if missing := [i for i in expected if i not in opened]:
        if not args.generate:
            fail(f"missing datasets {', '.join(missing)} under {get_dataset_path()} (run data_gen.py, or drop --no-generate)")
        run_data_gen(args, missing)
        opened.update({i: open_dataset(i, expected[i], args) for i in missing})
    def read(ds_id):
        try:
            ds = opened[ds_id][0]
            return flatten(ds), list(ds.storage.get_episode_metadata(range(ds.total_episodes)))
        except Exception as e:
            fail(f"dataset {ds_id} cannot be read ({one_line(e)}); {regenerate_hint(args)}")
    tgt_ds = opened[tgt_id][0]
    rows, lens, labels = [], [], []
    for ds_id, (dom, qual, _) in zip(src_ids, parse_source(args.source)):
        ds = opened[ds_id][0]
        if ds.observation_space != tgt_ds.observation_space or ds.action_space != tgt_ds.action_space:
            fail(f"the spaces of {ds_id} ({ds.observation_space}, {ds.action_space}) differ from the target's "
                 f"({tgt_ds.observation_space}, {tgt_ds.action_space})")
        (x, ep_lens), metas = read(ds_id)
        rows.append(x)
        for ep_len, meta in zip(ep_lens, metas):
            opts = meta.get("options") or {}  # domain/quality: for diagnostics only, the learner never reads them
            lens += ep_len
            labels += [(opts.get("domain", dom), opts.get("quality", qual))] * len(ep_len)
    ((tgt_x, _), _), (doms, quals) = read(tgt_id), zip(*labels)
    dom_names, qual_names = sorted(set(doms)), sorted(set(quals))
    t = lambda v, dtype=torch.long: torch.as_tensor(np.asarray(v), dtype=dtype, device=device)
    traj_len, src_x = t(lens), np.concatenate(rows)
    return dict(data=t(np.concatenate([src_x, tgt_x]), torch.float32), n_src=len(src_x), n_tgt=len(tgt_x), tgt_ds=tgt_ds,
                ds=tgt_ds.observation_space.shape[0], da=tgt_ds.action_space.shape[0], traj_len=traj_len,
                traj_start=torch.cumsum(traj_len, 0) - traj_len,
                traj_id=torch.repeat_interleave(torch.arange(len(lens), device=device), traj_len),
                dom=t([dom_names.index(x) for x in doms]), qual=t([qual_names.index(x) for x in quals]),
                dom_names=dom_names, qual_names=qual_names, records={i: opened[i][1] for i in expected})


# ---- Loop pieces shared by the stages -----------------------------------------------------------------------------
def run_stage(name, steps, step_fn, tags, writer, log_every, start=0, sps_tag=None, must_log=None, after_step=None):
    """Calls step_fn(i) for i = start+1..steps. The stacked losses stay on the device and are read (one host sync)
    every `log_every` steps, at the last step and where must_log(i); a non-finite loss stops the run there."""
    acc, last, t0, t_last = 0.0, start, time.time(), time.time()
    for i in range(start + 1, steps + 1):
        acc = acc + step_fn(i)
        if i % log_every == 0 or i == steps or (must_log and must_log(i)):
            vals = (acc / (i - last)).tolist()
            if not all(map(math.isfinite, vals)):
                fail(f"non-finite loss in {name} at step {i} ({dict(zip(tags, vals))}); nothing after the last "
                     f"checkpoint of this stage was saved")
            for tag, v in zip(tags, vals):
                writer.add_scalar(tag, v, i)
            sps, now = (i - last) / (time.time() - t_last), time.time()
            if sps_tag:
                writer.add_scalar(sps_tag, sps, i)
            print(f"[{name}] {i}/{steps}  {sps:.1f} it/s  ETA {(steps - i) * (now - t0) / (i - start) / 60:.1f} min  "
                  + "  ".join(f"{tag.split('/')[-1]} {v:.4g}" for tag, v in zip(tags, vals)), flush=True)
            acc, last = 0.0, i
        if after_step:
            after_step(i)
        if last == i:
            t_last = time.time()  # the time of logging, diagnostics and evaluation is not training time


@torch.no_grad()
def relabel(encoder: TrajectoryEncoder, d: dict, chunk: int = 64) -> torch.Tensor:
    """Eq. 5.2: z_tau = posterior mean of the FULL trajectory (<= 1000 steps, no crop), one row per trajectory."""
    z = torch.empty(len(d["traj_len"]), encoder.mu.out_features, device=d["data"].device)
    for c in torch.argsort(d["traj_len"]).split(chunk):  # similar lengths in a chunk: little padding
        L = d["traj_len"][c]
        idx = d["traj_start"][c, None] + torch.minimum(torch.arange(int(L.max()), device=L.device)[None], L[:, None] - 1)
        s, a, _, s2, _ = split(d["data"][idx], d["ds"], d["da"])
        z[c] = encoder(torch.cat([s, a, s2 - s], -1), L)[0]
    return z


def score_diagnostics(c: torch.Tensor, d: dict, writer: SummaryWriter):
    """The OT score per source domain and per domain-quality (mean, and a histogram of each): a dynamics score should
    rank the source domains by their distance to the target (§10)."""
    c, tid = c.cpu(), d["traj_id"].cpu()
    dom, qual = d["dom"].cpu()[tid], d["qual"].cpu()[tid]
    means = {}
    for k, name in enumerate(d["dom_names"]):
        if (m := dom == k).any():
            means[name] = c[m].mean().item()
            writer.add_scalar(f"dynamics/ot_score_mean/{name}", means[name], 0)
    for i, j in [(i, j) for i in range(len(d["dom_names"])) for j in range(len(d["qual_names"]))]:
        if (m := (dom == i) & (qual == j)).any():
            writer.add_histogram(f"dynamics/ot_score/{d['dom_names'][i]}-{d['qual_names'][j]}", c[m], 0)
    print("[stage 4 OT score] mean per source domain (higher: closer to the target): "
          + ", ".join(f"{k} {v:.4f}" for k, v in sorted(means.items(), key=lambda kv: -kv[1])), flush=True)


def z_diagnostics(z: torch.Tensor, d: dict, writer: SummaryWriter, seed: int):
    """Held-out (20 % of trajectories) nearest-centroid probe of the domain label on z, as balanced accuracy (mean
    per-domain recall, chance 1/#domains), and a projector embedding of z labelled domain/quality."""
    z, dom, qual, n_dom = z.cpu(), d["dom"].cpu(), d["qual"].cpu(), len(d["dom_names"])
    perm = torch.randperm(len(z), generator=torch.Generator().manual_seed(seed))
    test, train = perm[: max(1, len(z) // 5)], perm[max(1, len(z) // 5) :]
    cents = torch.stack([z[train][dom[train] == k].mean(0) for k in range(n_dom)]).nan_to_num(1e6)
    pred = torch.cdist(z[test], cents).argmin(1)
    acc = float(np.mean([(pred[dom[test] == k] == k).float().mean() for k in range(n_dom) if (dom[test] == k).any()]))
    writer.add_scalar("repr/domain_probe_acc", acc, 0)
    print(f"[stage 2 relabel] {len(z)} trajectories; held-out domain probe acc {acc:.3f} (chance {1 / n_dom:.3f})")
    sel = torch.cat([perm[dom[perm] == k][: 2000 // n_dom] for k in range(n_dom)])  # balanced subsample
    labels = [f"{d['dom_names'][dom[i]]}/{d['qual_names'][qual[i]]}" for i in sel.tolist()]
    writer.add_embedding(z[sel], metadata=labels, tag="z")


def evaluate(policy, env, episodes: int, seed: int) -> np.ndarray:
    """Undiscounted returns of deterministic episodes; `policy` maps a CPU observation to an action in [-1, 1]."""
    returns = []
    for ep in range(episodes):
        (obs, _), done, ret = env.reset(seed=seed + ep), False, 0.0
        while not done:
            with torch.no_grad():
                a = policy(torch.as_tensor(obs, dtype=torch.float32)).numpy()
            obs, r, term, trunc, _ = env.step(a * env.action_space.high)
            ret, done = ret + float(r), term or trunc
        returns.append(ret)
    return np.array(returns)


def optimize(opt, loss: torch.Tensor, params: Optional[list] = None, clip=None) -> torch.Tensor:
    """zero_grad -> backward into `params` only (all leaves if None) -> optional grad-norm clip -> step. `opt` may be
    a list of optimizers whose losses were summed into `loss` (exact when the losses share no parameter)."""
    opts = opt if isinstance(opt, list) else [opt]
    for o in opts:
        o.zero_grad()
    loss.backward(inputs=params)
    if clip is not None:
        nn.utils.clip_grad_norm_(params, clip)
    for o in opts:
        o.step()
    return loss.detach()


def compiled(fn, args, dev: torch.device):
    """`fn` (a forward pass to a loss) compiled by torch.compile when --compile: inductor fuses the elementwise work of
    the forward and, through AOTAutograd, of the backward around the matmuls; the optimizer steps stay eager (fused
    Adam: one kernel each). On CUDA, mode reduce-overhead replays the forward and the backward as CUDA graphs. Compiled
    code draws the same random numbers as eager code (fallback_random)."""
    if not args.compile:
        return fn
    torch._inductor.config.fallback_random = True
    return torch.compile(fn, dynamic=False, mode="reduce-overhead" if dev.type == "cuda" else None)


def bench_stage(name: str, step_fn, steps: int, warmup: int = 20, matmul_gflops: float = 0.0):
    """Print the rate of `step_fn` over a timed window after `warmup` calls (compilation happens there), and the
    achieved GFLOP/s (FLOPs counted on one eager call by FlopCounterMode) against the measured matmul rate."""
    t0 = time.perf_counter()
    for i in range(warmup):
        out = step_fn(i + 1)
    out.tolist()  # waits for the device
    t1 = time.perf_counter()
    for i in range(steps):
        out = step_fn(warmup + i + 1)
    out.tolist()
    dt = time.perf_counter() - t1
    with torch.utils.flop_counter.FlopCounterMode(display=False) as counter, torch.compiler.set_stance("force_eager"):
        step_fn(warmup + steps + 1)
    gflop = counter.get_total_flops() / 1e9
    roof = f" = {100 * gflop * steps / dt / matmul_gflops:.0f} % of the matmul rate" if matmul_gflops else ""
    print(f"bench {name}: {steps / dt:.1f} steps/s ({1000 * dt / steps:.2f} ms/step; warm-up {t1 - t0:.1f} s); "
          f"{gflop:.3f} GFLOP/step, {gflop * steps / dt:.0f} GFLOP/s{roof}", flush=True)


def matmul_rate(dev: torch.device, m: int = 192, k: int = 256, n: int = 256, seconds: float = 1.0) -> float:
    """GFLOP/s of an fp32 [m, k] x [k, n] matmul, the largest shape of the stage-5 update: the roofline reference."""
    a, b, reps = torch.randn(m, k, device=dev), torch.randn(k, n, device=dev), 0
    (a @ b).sum().item()
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(100):
            c = a @ b
        c.sum().item()
        reps += 100
    return 2 * m * k * n * reps / (time.perf_counter() - t0) / 1e9


def save(obj: dict, path: str):
    torch.save(obj, path + ".tmp")
    os.replace(path + ".tmp", path)  # atomic: an interrupted save leaves the previous checkpoint intact


DESCRIPTION = (
    "V2A cross-domain offline RL with the TD3+BC backbone, end to end in one process: TC-ELBO modality encoder, "
    "z-relabelling, modality-aware advantage, contrastive dynamics score, value-and-dynamics filter, filtered TD3+BC, "
    "evaluation in the target env; the baselines dvdf, igdf, merged and target via --variant, and OTDF's optimal-transport "
    "dynamics score instead of the contrastive one via --dynamics-score ot (igdf: OTDF, dvdf: DVDF-OTDF, v2a: V2A-OTDF; "
    "about 6 min on the default data). Example: python "
    "v2a_td3bc.py --env-id Hopper-v4 --variant v2a. Supported env ids: " + ", ".join(SUPPORTED_ENV_IDS) + ". A default "
    "run first generates its datasets with data_gen.py if they are missing (1M source transitions, 100k target), "
    "then takes about 6-7 hours on one core of a 2-core CPU (100k TC-ELBO iterations about 4.6 h, " + STAGE5_TIME +
    "). A reduced budget, about 30 min there: --repr-steps 5000 --sql-steps 30000 --total-steps 100000. Runs go to "
    "runs/<env>__<script>__<variant>__<seed>__<time>/ (TensorBoard, checkpoints, results.json); docs/v2a_td3bc.md.")


def main(args: Args):
    # ---- Setup: every check first (flags, datasets, the checkpoints to load), then the run directory and logging -----
    torch.set_flush_denormal(True)  # subnormal floats take a slow path on x86 CPUs: they triple the GRU's cost
    validate_args(args)
    if args.resume:
        check_resume(args)
    stages, bench = VARIANT_STAGES[args.variant], args.bench > 0
    lam = PUBLISHED_TRADEOFF.get(args.variant, 0.0) if args.tradeoff is None else args.tradeoff
    row = ROW_NAMES.get((args.variant, args.dynamics_score), args.variant)  # e.g. v2a-otdf
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    dev = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    if args.cuda and dev.type == "cpu":
        print("CUDA not available: running on CPU", flush=True)
    adam = functools.partial(torch.optim.Adam, lr=args.learning_rate, fused=True)
    bf16 = functools.partial(torch.autocast, dev.type, dtype=torch.bfloat16, enabled=args.bf16)

    d = load_data(args, dev)
    mm_rate = matmul_rate(dev) if bench else 0.0
    if bench:
        print(f"bench: device {dev}, {torch.get_num_threads()} threads, fp32 192x256x256 matmul {mm_rate:.0f} GFLOP/s; "
              f"stages are timed on untrained networks", flush=True)
    data, Ns, Nt, ds, da, B = d["data"], d["n_src"], d["n_tgt"], d["ds"], d["da"], args.batch_size
    n_traj, SA, S2 = len(d["traj_len"]), slice(0, ds + da), slice(ds + da + 1, 2 * ds + da + 1)  # row columns
    print(f"data: {Ns} source transitions in {n_traj} trajectories ({', '.join(d['dom_names'])}), {Nt} target "
          f"transitions; device {dev}", flush=True)
    keys = stage_keys(args, d["records"], stages)
    cks = {} if bench else load_checkpoints(args, stages, keys, dev)
    run_dir = (args.resume.rstrip("/") if args.resume else tempfile.mkdtemp(prefix="v2a_bench_") if bench
               else f"runs/{args.env_id}__{args.exp_name}__{row}__{args.seed}__{int(time.time())}")
    if args.resume:  # what this process computes again is logged again: drop it from the event files first
        cut_events(run_dir, {0: -1, **{k: math.inf if k in cks else -1 for k in (1, 2, 3, 4)},
                             5: cks[5][1]["step"] if 5 in cks else -1})
    if args.track:
        import wandb
        wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, sync_tensorboard=True,
                   config=vars(args), name=os.path.basename(run_dir), save_code=True)
    writer = SummaryWriter(run_dir)
    hparams = {**vars(args), "script": SCRIPT, "resolved_tradeoff": lam, "kept_per_step": kept_count(B, args.xi),
               "device": str(dev), "datasets": d["records"]}
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in hparams.items()))
    with open(os.path.join(run_dir, "args.json"), "w") as fh:
        json.dump(hparams, fh, indent=1)

    def checkpoint(k: int) -> Optional[dict]:
        """Stage k's checkpoint from this run (--resume) or, for k <= 4, from the --reuse-stages run (checked above)."""
        if k in cks:
            print(f"[stage {k}] loaded {cks[k][0]}", flush=True)
            return cks[k][1]

    # ---- Stage 1: TC-ELBO modality encoder (eq. 5.1). E-step: loss L_rec + beta KL with sampled z, decoder frozen;
    #      M-step: L_rec with the posterior-mean z, encoder frozen. 16 trajectories per iteration, random 200-step crops
    encoder = TrajectoryEncoder(2 * ds + da, args.z_dim).to(dev)
    decoder = EnsembleMLP(3, ds + da + args.z_dim, ds, decoder_init=True).to(dev)
    if 1 in stages and (ck := checkpoint(1)) is not None:
        encoder.load_state_dict(ck["encoder"])
        decoder.load_state_dict(ck["decoder"])
    elif 1 in stages:
        enc_opt, dec_opt = adam(encoder.parameters()), adam(decoder.parameters())
        def repr_step(i):
            tid = torch.randint(n_traj, (REPR_BATCH,), device=dev)
            L = d["traj_len"][tid]
            T = int(L.max().clamp(max=REPR_CROP))  # one host sync: pad to the longest window, as the code does
            off = (torch.rand(len(tid), device=dev) * ((L - T).clamp(min=0) + 1)).long()  # random crop start
            lens, ar = L.clamp(max=T), torch.arange(T, device=dev)
            idx = d["traj_start"][tid, None] + off[:, None] + torch.minimum(ar[None], lens[:, None] - 1)
            mask = (ar[None] < lens[:, None]).float()
            s, a, _, s2, _ = split(data[idx], ds, da)
            seq = torch.cat([s, a, s2 - s], -1)
            mu, log_std = encoder(seq, lens)
            z = mu + log_std.exp() * torch.randn_like(mu)  # E-step
            with bf16():
                rec, kl = tc_elbo_losses(decoder, s, a, s2 - s, mask, z, mu, log_std)
            optimize(enc_opt, rec + KL_BETA * kl, list(encoder.parameters()), GRAD_CLIP)  # decoder frozen
            with torch.no_grad():  # M-step: posterior mean of the updated, frozen encoder
                mu_m = encoder(seq, lens)[0]
            with bf16():
                rec_m = tc_elbo_losses(decoder, s, a, s2 - s, mask, mu_m, mu_m, log_std.detach())[0]
            rec_m = optimize(dec_opt, rec_m, list(decoder.parameters()), GRAD_CLIP)
            return torch.stack([rec.detach(), kl.detach(), rec_m])

        if bench:
            bench_stage("stage 1 TC-ELBO iterations", repr_step, max(5, args.bench // 50), 5, mm_rate)
        else:
            run_stage("stage 1 TC-ELBO", args.repr_steps, repr_step, ["repr/rec_loss", "repr/kl", "repr/rec_loss_mstep"],
                      writer, max(1, args.log_freq // 10))
            save(dict(encoder=encoder.state_dict(), decoder=decoder.state_dict(), key=keys[1]), f"{run_dir}/stage1.pt")

    # ---- Stage 2: relabel each source trajectory with the posterior mean z of the full trajectory (eq. 5.2) ----------
    z_traj = torch.zeros(n_traj, args.z_dim if 2 in stages else 0, device=dev)  # dvdf: 0 dims, Q(s,a,z) = Q(s,a)
    if 2 in stages and (ck := checkpoint(2)) is not None:
        if ck["z_traj"].shape != z_traj.shape:
            fail(f"stage2.pt holds z for {ck['z_traj'].shape[0]} trajectories, but the source data has {n_traj}")
        z_traj = ck["z_traj"]
    elif 2 in stages:
        z_traj = relabel(encoder, d)
        if not bench:
            save(dict(z_traj=z_traj, key=keys[2]), f"{run_dir}/stage2.pt")
            z_diagnostics(z_traj, d, writer, args.seed)
    zs = lambda v, idx: torch.cat([v, z_traj[d["traj_id"][idx]]], 1)  # [v, z] for rows idx: z constant per trajectory

    # ---- Stage 3: modality-aware advantage (eq. 5.3), Sparse Q-Learning Q(s,a,z), V(s,z) on source data, alpha 0.2: --
    #      V update, Q update, Polyak every 2nd step. The filter uses A = min(Q1, Q2) - V of the ONLINE Q nets
    sql_q, sql_v = EnsembleMLP(2, ds + da + z_traj.shape[1], 1).to(dev), mlp(ds + z_traj.shape[1], 1).to(dev)
    if 3 in stages and (ck := checkpoint(3)) is not None:
        sql_q.load_state_dict(ck["q"])
        sql_v.load_state_dict(ck["v"])
    elif 3 in stages:
        sql_qt = copy.deepcopy(sql_q).requires_grad_(False)
        q_opt, v_opt = adam(sql_q.parameters()), adam(sql_v.parameters())
        def sql_step(i):
            idx = torch.randint(Ns, (SQL_BATCH,), device=dev)
            x = data[idx]
            s, a, r, s2, done = split(x, ds, da)
            with torch.no_grad():
                q_min = sql_qt(zs(x[:, SA], idx)).min(0).values.squeeze(-1)
            v_loss = optimize(v_opt, sql_v_loss(q_min, sql_v(zs(s, idx)).squeeze(-1), args.sql_alpha))
            with torch.no_grad():  # V(s', z) with the transition's own z (docs/specification.md §14 item 13)
                y = r + args.gamma * (1 - done) * sql_v(zs(s2, idx)).squeeze(-1)
            q_loss = optimize(q_opt, td_loss(sql_q(zs(x[:, SA], idx)).squeeze(-1), y))
            if i % 2 == 0:
                with torch.no_grad():
                    torch._foreach_lerp_(list(sql_qt.parameters()), list(sql_q.parameters()), args.tau)
            return torch.stack([v_loss, q_loss])

        if bench:
            bench_stage("stage 3 SQL steps", sql_step, args.bench, 100, mm_rate)
        else:
            run_stage(f"stage 3 SQL {'Q(s,a,z)' if z_traj.shape[1] else 'Q(s,a)'}", args.sql_steps, sql_step,
                      ["losses/sql_v_loss", "losses/sql_q_loss"], writer, args.log_freq)
            save(dict(q=sql_q.state_dict(), v=sql_v.state_dict(), key=keys[3]), f"{run_dir}/stage3.pt")

    # ---- Stage 4: dynamics score. contrastive (eq. 5.4): binary NCE with target (s,a,s') positives and B-1 source ----
    #      next-state negatives, B x B logits from one matmul, 7000 steps; then h = cos(phi(s,a), psi(s')).
    #      ot (§10, OTDF): the OT score c of every source row against the target rows, computed once (ot_scores)
    phi, psi = mlp(ds + da, 64).to(dev), mlp(ds, 64).to(dev)
    ot_score, c_src = 4 in stages and args.dynamics_score == "ot", None
    if ot_score and (ck := checkpoint(4)) is not None:
        if ck["c_src"].shape != (Ns,):
            fail(f"stage4.pt holds OT scores of {ck['c_src'].shape[0]} source rows, but the source data has {Ns}")
        c_src = ck["c_src"]
    elif ot_score:
        rows = lambda x: torch.cat([x[:, SA], x[:, S2]], 1)  # [s, a, s']
        ot_stage = lambda src: ot_scores(rows(src), rows(data[Ns:]), args.seed)
        if bench:
            n = min(Ns, OT_CHUNK)  # one chunk per step: the stage takes about Ns / OT_CHUNK of them
            bench_stage(f"stage 4 OT score of one {n}-row chunk", lambda i: ot_stage(data[:n])[:1], 2, 1, mm_rate)
        else:
            t0 = time.time()
            c_src = ot_stage(data[:Ns])
            print(f"[stage 4 OT score] {Ns} source rows against {min(Nt, OT_TARGET)} of {Nt} target rows in "
                  f"{time.time() - t0:.1f} s", flush=True)
            save(dict(c_src=c_src, key=keys[4]), f"{run_dir}/stage4.pt")
            score_diagnostics(c_src, d, writer)
    elif 4 in stages and (ck := checkpoint(4)) is not None:
        phi.load_state_dict(ck["phi"])
        psi.load_state_dict(ck["psi"])
    elif 4 in stages:
        info_opt = adam([*phi.parameters(), *psi.parameters()])
        def info_step(i):
            x = data[Ns + torch.randint(Nt, (B,), device=dev)]
            enc = psi(torch.cat([x[:, S2], data[torch.randint(Ns, (B - 1,), device=dev), S2]]))  # one psi pass
            return optimize(info_opt, info_nce_loss(phi(x[:, SA]), enc[:B], enc[B:]))[None]

        if bench:
            bench_stage("stage 4 contrastive steps", info_step, args.bench, 100, mm_rate)
        else:
            run_stage("stage 4 contrastive h", args.info_steps, info_step, ["losses/info_loss"], writer, args.log_freq)
            save(dict(phi=phi.state_dict(), psi=psi.state_dict(), key=keys[4]), f"{run_dir}/stage4.pt")
    for net in (sql_q, sql_v, phi, psi):  # frozen scorers: no gradient reaches them in stage 5
        net.requires_grad_(False)

    @torch.no_grad()
    def score_source(idx: torch.Tensor):
        """h(s,a,s') (the OT score c: not yet normalised per batch) and A(s,a,z) = min(Q1, Q2)(s,a,z) - V(s,z) of source
        rows idx (A = 0 without stage 3)."""
        x = data[idx]
        h = c_src[idx] if c_src is not None else cosine_score(phi(x[:, SA]), psi(x[:, S2]))
        return h, (sql_q(zs(x[:, SA], idx)).min(0).values - sql_v(zs(x[:, :ds], idx))).squeeze(-1) if 3 in stages else h * 0

    # ---- Stage 5a: the filter (eq. 5.5). Keep the top n = max(1, min(B, floor(xi B))) of B source samples by ---------
    #      f = lambda h + (1 - lambda) minmax(A); w = min(exp(h), 100) on kept source rows, 1 on the B target rows.
    #      With the OT score, h is the batch's c normalised as OTDF does (ot_batch_norm, §10)
    filtered, n_keep = args.variant in PUBLISHED_TRADEOFF, kept_count(B, args.xi)
    batch_h = ot_batch_norm if c_src is not None else lambda h: h
    # The scorers are frozen, so h and A of a source row never change in stage 5: score every source row once (seconds)
    # and let each step gather its rows' scores. Same numbers as scoring each batch, up to float rounding.
    h_src = adv_src = torch.zeros(Ns, device=dev)
    if filtered:
        t0 = time.time()
        h_src, adv_src = map(torch.cat, zip(*(score_source(c) for c in torch.arange(Ns, device=dev).split(65536))))
        print(f"[stage 5] scored {Ns} source rows (h, A) in {time.time() - t0:.1f} s", flush=True)

    def sample_batch():
        """Row indices of B source and B target samples, drawn on the device (the update filters the source rows)."""
        return torch.randint(Ns, (B,), device=dev), Ns + torch.randint(Nt, (B,), device=dev)

    def filtered_batch(src_idx: torch.Tensor, tgt_idx: torch.Tensor):
        """Stage-5 batch D' (rows [s, a, r, s', d]: kept source rows, then the B target rows) and its Q-loss weights w."""
        if args.variant == "target":
            return data[tgt_idx], None
        if not filtered:  # merged: xi = 1, w = 1, no scorers
            return data[torch.cat([src_idx, tgt_idx])], None
        h, adv = batch_h(h_src[src_idx]), adv_src[src_idx]
        keep = select_kept(filter_scores(h, adv, lam)[0], n_keep)
        return data[torch.cat([src_idx[keep], tgt_idx])], torch.cat([source_weight(h[keep]), torch.ones_like(h)])

    # >>> backbone: TD3+BC
    # ---- Stage 5b: TD3+BC on D' (docs/specification.md §9): twin critics, TD loss weighted by w, targets from the
    #      target actor with smoothing noise; every policy_freq steps the actor (unweighted, Q1 only) and Polyak on
    #      actor and critics
    actor, qf = nn.Sequential(mlp(ds, da), nn.Tanh()).to(dev), EnsembleMLP(2, ds + da, 1).to(dev)
    actor_t, qf_t = copy.deepcopy(actor).requires_grad_(False), copy.deepcopy(qf).requires_grad_(False)
    nets = dict(actor=actor, actor_target=actor_t, qf=qf, qf_target=qf_t)
    opts = qf_opt, actor_opt = [adam(net.parameters()) for net in (qf, actor)]
    scheds, loss_tags, actor_loss = [], ["losses/qf_loss", "losses/actor_loss"], torch.zeros((), device=dev)
    # statistics of the target data: the policy acts in the target env, and they do not move with the filter
    s_mean, s_std = (data[Ns:, :ds].mean(0), data[Ns:, :ds].std(0) + 1e-3) if args.normalize_states else (0.0, 1.0)
    online, target = [*qf.parameters(), *actor.parameters()], [*qf_t.parameters(), *actor_t.parameters()]

    def critic_loss(x: torch.Tensor, w: Optional[torch.Tensor]):
        s, a, r, s2, done = split(x, ds, da)
        s, s2 = (s - s_mean) / s_std, (s2 - s_mean) / s_std
        with torch.no_grad():
            a2 = smoothed_target_action(actor_t(s2), args.policy_noise, args.noise_clip)
            y = r + args.gamma * (1 - done) * qf_t(torch.cat([s2, a2], -1)).min(0).values.squeeze(-1)
        return td_loss(qf(torch.cat([s, a], -1)).squeeze(-1), y, w), s, a

    def actor_loss_(s: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        pi = actor(s)
        return td3bc_actor_loss(qf(torch.cat([s, pi], -1))[0].squeeze(-1), pi, a, args.alpha)

    critic_loss_fn, actor_loss_fn = compiled(critic_loss, args, dev), compiled(actor_loss_, args, dev)

    def train_step(i: int):
        with bf16():
            qf_loss, s, a = critic_loss_fn(*filtered_batch(*sample_batch()))
        qf_loss = optimize(qf_opt, qf_loss)
        if i % args.policy_freq == 0:
            with bf16():
                loss = actor_loss_fn(s, a)
            actor_loss.copy_(optimize(actor_opt, loss, list(actor.parameters())))
            with torch.no_grad():
                torch._foreach_lerp_(target, online, args.tau)
        return torch.stack([qf_loss, actor_loss])

    def eval_policy():  # the deterministic actor on normalised states, a CPU copy
        net, mean, std = copy.deepcopy(actor).cpu(), *(torch.as_tensor(v).cpu() for v in (s_mean, s_std))
        return lambda obs: net((obs - mean) / std)
    # <<< backbone

    if bench:
        bench_stage(f"stage 5 {row} updates ({'compiled' if args.compile else 'eager'})", train_step, args.bench,
                    100, mm_rate)
        return

    diag_gen = torch.Generator(device=dev).manual_seed(args.seed)  # its own RNG: training is the same for any --log-freq

    @torch.no_grad()
    def filter_diagnostics(step: int, chunks: int = 16):
        """The filter on `chunks` fresh source batches, off the hot path (frozen scorers: same distribution as the
        training batches): kept-row means, kept fraction per domain and quality, A per domain-quality (Fig. 2(b))."""
        idx = torch.randint(Ns, (chunks, B), device=dev, generator=diag_gen)
        h, adv = batch_h(h_src[idx]), adv_src[idx]
        f, adv_norm = filter_scores(h, adv, lam)
        keep = select_kept(f, n_keep)
        for tag, v in (("h_mean", h), ("adv_norm_mean", adv_norm), ("weight_mean", source_weight(h))):
            writer.add_scalar(f"filter/{tag}", v.gather(1, keep).mean().item(), step)
        kept, tid = torch.zeros_like(h).scatter_(1, keep, 1.0).cpu(), d["traj_id"][idx].cpu()
        dom, qual, adv = d["dom"].cpu()[tid], d["qual"].cpu()[tid], adv.cpu()
        for lab, names in ((dom, d["dom_names"]), (qual, d["qual_names"])):
            for k in [k for k in range(len(names)) if (lab == k).any()]:
                writer.add_scalar(f"filter/kept_frac/{names[k]}", kept[lab == k].mean().item(), step)
        for i, j in [(i, j) for i in range(len(d["dom_names"])) for j in range(len(d["qual_names"]))]:
            if 3 in stages and (m := (dom == i) & (qual == j)).any():
                writer.add_histogram(f"filter/adv/{d['dom_names'][i]}-{d['qual_names'][j]}", adv[m], step)

    start, evals = 0, []
    if (ck := checkpoint(5)) is not None:
        for key, net in nets.items():
            net.load_state_dict(ck[key])
        for opt, state in zip(opts, ck["opts"]):
            opt.load_state_dict(state)
        for sched, state in zip(scheds, ck["scheds"]):
            sched.load_state_dict(state)
            sched.T_max = args.total_steps  # a finished run can be extended with a larger --total-steps
        setters = (torch.set_rng_state, np.random.set_state, random.setstate, torch.cuda.set_rng_state_all)
        for set_state, state in zip(setters, ck["rng"]):
            if state is not None:
                set_state(state)
        diag_gen.set_state(ck["diag_rng"])
        start, evals = ck["step"], ck["evals"]
        print(f"[stage 5] resuming from step {start}", flush=True)
    eval_env = d["tgt_ds"].recover_environment(eval_env=True)
    is_eval_step = lambda i: i % args.eval_freq == 0 or i == args.total_steps

    def after_step(step: int):  # run_stage has just read (and checked) the losses if step % log_freq == 0 or eval step
        if filtered and (step % args.log_freq == 0 or is_eval_step(step)):
            filter_diagnostics(step)
        if is_eval_step(step):
            returns = evaluate(eval_policy(), eval_env, args.eval_episodes, args.seed + 10_000)
            score = float(np.mean(minari.get_normalized_score(d["tgt_ds"], returns)) * 100)
            writer.add_scalar("eval/return", returns.mean(), step)
            writer.add_scalar("eval/normalized_score", score, step)
            evals.append((step, float(returns.mean()), score))
            print(f"[eval] step {step}: return {returns.mean():.1f} +- {returns.std():.1f}, normalized score {score:.1f}")
            rng = (torch.get_rng_state(), np.random.get_state(), random.getstate(),
                   torch.cuda.get_rng_state_all() if dev.type == "cuda" else None)
            save(dict(step=step, **{k: net.state_dict() for k, net in nets.items()}, opts=[o.state_dict() for o in opts],
                      scheds=[sc.state_dict() for sc in scheds], rng=rng, evals=evals, diag_rng=diag_gen.get_state(),
                      key=keys[5]),
                 f"{run_dir}/stage5.pt")

    name = f"stage 5 TD3+BC {row}" + (f" lambda {lam} xi {args.xi} keep {n_keep}/{B}" if filtered else "")
    run_stage(name, args.total_steps, train_step, loss_tags, writer, args.log_freq, start=start, sps_tag="charts/SPS",
              must_log=is_eval_step, after_step=after_step)
    if evals:
        with open(os.path.join(run_dir, "results.json"), "w") as fh:  # (step, return, normalized score) per evaluation
            json.dump({"variant": args.variant, "dynamics_score": args.dynamics_score, "row": row,
                       "final_normalized_score": evals[-1][2], "evals": evals}, fh, indent=1)
        print(f"done: {run_dir}  final (last, not best) normalized score {evals[-1][2]:.1f}", flush=True)
    eval_env.close()
    writer.close()


if __name__ == "__main__":
    try:
        main(tyro.cli(Args, description=DESCRIPTION))
    except KeyboardInterrupt:  # one line, no traceback: every stage's last checkpoint is intact (atomic saves)
        fail("interrupted (Ctrl-C); continue the run with --resume runs/<its directory> (stage 5 restarts from its last "
             "evaluation, an unfinished earlier stage from its beginning)")
