# Plumbing shared by v2a_iql.py and v2a_td3bc.py: flag and dataset checks, checkpoints that can be trusted (their keys
# and checks, and the run folder's creation and lock, are in v2a_integrity.py), the training loop's logging, evaluation
# and timing (--bench and the estimate in v2a_timing.py; both imported here). The method itself (networks, losses,
# stages) is in each script; nothing here changes what a run computes.
# docs: docs/v2a_iql.md ("Reading the code")
import io
import json
import math
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Optional

import minari
import numpy as np
import torch
import torch._dynamo
import torch._inductor.config
import torch.nn as nn
import torch.utils.flop_counter
from minari.storage import get_dataset_path
from torch.utils.tensorboard import SummaryWriter

import data_gen
from data_gen import DEFAULT_SOURCES, MAX_DATASET_TRANSITIONS, SUPPORTED_ENV_IDS, one_line
from data_gen_parent import child_error
from data_gen_truth import flatten, stored_provenance
from v2a_integrity import (
    check_resume,
    cli,
    code_version,
    cut_events,
    fail,
    load_checkpoints,
    new_run_folder,
    sql_discount,
    stage_keys,
    why,
    write_whole,
)
from v2a_stability import ValueWatch
from v2a_timing import bench_stage, estimate, machine_probe, machine_speed, matmul_rate

__all__ = ["DEFAULT_SOURCES", "MAX_DATASET_TRANSITIONS", "SUPPORTED_ENV_IDS"]  # re-exported: data_gen.py's, not a copy
__all__ += ["check_resume", "cli", "sql_discount", "stage_keys"]  # re-exported: v2a_integrity.py's (utils.X in the scripts)
__all__ += ["bench_stage", "estimate"]  # re-exported: v2a_timing.py's


def parse_source(spec: str) -> list[tuple[str, str, float]]:
    """`domain:quality[:weight]` entries -> [(domain, quality, weight)], data_gen.py's grammar and messages."""
    try:
        return data_gen.parse_source(spec)
    except data_gen.DataGenError as e:
        fail(str(e))


# ---- Datasets: Minari episodes -> one device matrix of rows [s, a, r, s', d], source rows first, then target rows --
def expected_generation(args) -> dict[str, dict]:
    """Dataset id -> the generation record data_gen.py stores in it, as the flags imply it (source ids first, the
    target last). The data seed is not a flag here: it is recorded in args.json, not compared."""
    entries = parse_source(args.source)  # first: a malformed --source is one line with this program's name
    src_ids, tgt_id = data_gen.dataset_ids(args.env_id, args.source, args.source_size, args.target_size)
    total = sum(w for _, _, w in entries)
    rec = lambda dom, q, n, mix: dict(env_id=args.env_id, domain=dom, quality=q, transitions=n, mixture=mix)
    return {**{i: rec(d, q, int(args.source_size * w / total), args.source) for i, (d, q, w) in zip(src_ids, entries)},
            tgt_id: rec("nominal", "medium", args.target_size, None)}


def validate_args(args, variant_stages: dict, filtered: dict, backbone_errors: list[str]):
    """Every flag of a training script, checked before anything runs (data generation included); resolves the default
    --source. `filtered`: the variants with a filter (v2a, dvdf, igdf); `backbone_errors`: the backbone's own messages."""
    if args.env_id not in SUPPORTED_ENV_IDS:
        fail(f"unknown --env-id {args.env_id!r}; supported: {', '.join(SUPPORTED_ENV_IDS)}")
    args.source = data_gen.resolve_source(args.env_id, args.source)  # the default, or a named mixture's entries
    entries = parse_source(args.source)  # sizes <= 0 before the dataset ids are built, in data_gen.py's words
    if args.target_size < 1:
        fail(f"--target-size {args.target_size}: the target dataset would get no transition; the minimum is 1")
    if args.source_size < 1:
        total = sum(w for _, _, w in entries)
        fail(f"--source-size {args.source_size}: must be a positive number of transitions"
             + (f"; the minimum --source-size for this mixture is {data_gen.min_source_size(entries)}"
                if math.isfinite(total) else ""))
    for ds_id, rec in expected_generation(args).items():
        if not 1 <= rec["transitions"] <= MAX_DATASET_TRANSITIONS:
            fail(f"{ds_id} ({rec['domain']}:{rec['quality']}) would get {rec['transitions']:,} transitions; a dataset "
                 f"holds 1 to {MAX_DATASET_TRANSITIONS:,} (data_gen.py's cap): change --source-size, --target-size or "
                 f"the weights")
    stages, bench, runs = variant_stages[args.variant], args.bench > 0, [args.resume, args.reuse_stages]
    budgets = {1: ("repr-steps", args.repr_steps), 3: ("sql-steps", args.sql_steps), 4: ("info-steps", args.info_steps)}
    trained = [k for k in stages if k in budgets and (k != 4 or args.dynamics_score == "contrastive")]  # ot: no steps
    sql_gamma, sql_tau = sql_discount(args)
    checks = [
        (not 0 <= args.seed < 2**31, f"--seed must lie in [0, 2^31), got {args.seed}"),
        (not 0 < args.xi <= 1 or (args.tradeoff is not None and not 0 <= args.tradeoff <= 1),
         f"--xi must lie in (0, 1] and --tradeoff in [0, 1]; got xi {args.xi}, tradeoff {args.tradeoff}"),
        (args.tradeoff is not None and args.variant not in ("v2a", "dvdf"),
         f"--tradeoff applies to the v2a and dvdf variants only, not to {args.variant}"),
        (args.dynamics_score != "contrastive" and args.variant not in filtered,
         f"--dynamics-score applies to the filtered variants v2a, dvdf and igdf only, not to {args.variant}"),
        (args.oracle != "none" and args.variant not in filtered,
         f"--oracle applies to the filtered variants v2a, dvdf and igdf only, not to {args.variant}"),
        (args.oracle != "none" and args.dynamics_score != "contrastive",
         "--oracle replaces the dynamics score h, so --dynamics-score has nothing to do with it: leave it at contrastive"),
        (args.filter_only and args.variant not in filtered,
         f"--filter-only measures a filter: it applies to v2a, dvdf and igdf only, not to {args.variant}"),
        *[(n <= 0 and not bench, f"--{flag} must be > 0 for the {args.variant} variant, got {n}")
          for flag, n in [budgets[k] for k in trained] + [("total-steps", args.total_steps)]],
        *[(n < 0, f"--{flag} must be >= 0, got {n}") for flag, n in budgets.values()],
        *[(n <= 0, f"--{flag.replace('_', '-')} must be > 0, got {n}") for flag, n in [(f, getattr(args, f)) for f in (
            "eval_freq", "eval_episodes", "final_eval_episodes", "log_freq", "batch_size", "z_dim")]],
        (args.threads < 1, f"--threads {args.threads}: must be at least 1"),
        (not 0 < args.learning_rate < math.inf, f"--learning-rate must be finite and > 0, got {args.learning_rate}"),
        (not 0 < args.sql_alpha < math.inf, f"--sql-alpha must be finite and > 0, got {args.sql_alpha}"),
        (not 0 <= args.gamma <= 1 or not 0 < args.tau <= 1,
         f"--gamma must lie in [0, 1] and --tau in (0, 1]; got gamma {args.gamma}, tau {args.tau}"),
        (not 0 <= sql_gamma <= 1 or not 0 < sql_tau <= 1,
         f"--sql-gamma must lie in [0, 1] and --sql-tau in (0, 1]; got {args.sql_gamma}, {args.sql_tau}"),
        *[(True, msg) for msg in backbone_errors],
        (args.bench < 0 or (bench and any(runs)), "--bench takes a number >= 0 and excludes --resume/--reuse-stages"),
        (all(runs), "--resume and --reuse-stages exclude each other"),
        *[(not os.path.isdir(run), f"{run} is not a run directory") for run in filter(None, runs)],
    ]
    for bad, msg in checks:
        if bad:
            fail(msg)


def split(x: torch.Tensor, ds: int, da: int):
    return x[..., :ds], x[..., ds : ds + da], x[..., ds + da], x[..., ds + da + 1 : 2 * ds + da + 1], x[..., -1]


def regenerate_hint(args) -> str:
    return (f"regenerate it with python data_gen.py --env-id {args.env_id} --source '{args.source}' --source-size "
            f"{args.source_size} --target-size {args.target_size} --overwrite, or set MINARI_DATASETS_PATH to another "
            f"folder")


def open_dataset(ds_id: str, expected: dict, args):
    """Loads one dataset and checks its generation record against the flags; the record returned (args.json's
    "datasets") also carries its stored fingerprint and machine (None for a dataset made before them)."""
    try:
        ds = minari.load_dataset(ds_id)
        record = json.loads(ds.storage.metadata.get("v2a_generation", "null"))
    except Exception as e:
        fail(f"dataset {ds_id} cannot be loaded ({one_line(e)}); {regenerate_hint(args)}")
    if not isinstance(record, dict):
        fail(f"dataset {ds_id} has no generation record (data_gen.py did not make it); {regenerate_hint(args)}")
    if diff := [f"{k} {record.get(k)!r} (the flags imply {v!r})" for k, v in expected.items() if record.get(k) != v]:
        fail(f"dataset {ds_id} was generated with other arguments: {', '.join(diff)}; {regenerate_hint(args)}")
    stored_fingerprint, made_on = stored_provenance(ds.storage.metadata)
    return ds, dict(record, fingerprint=stored_fingerprint, machine=made_on)


def run_data_gen(args, missing: list[str]):
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
    if child.returncode != 0:  # its one-line error; a crash on a full disk as one line too (what it left is removed)
        line, output = child_error(child.returncode, err, data_gen.datasets_root())
        sys.stderr.write(output)  # another crash: its traceback, which the user needs
        fail(line)


def load_data(args, device: torch.device) -> dict:
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
            ds, record = opened[ds_id]
            (x, lens, content, gap), metas = flatten(ds), list(ds.storage.get_episode_metadata(range(ds.total_episodes)))
        except Exception as e:
            fail(f"dataset {ds_id} cannot be read ({one_line(e)}); {regenerate_hint(args)}")
        if not np.isfinite(x).all():  # here, not as a non-finite loss stages later, after a run folder was written
            n_s, n_a = ds.observation_space.shape[0], ds.action_space.shape[0]
            cols = {"observations": [*range(n_s), *range(n_s + n_a + 1, 2 * n_s + n_a + 1)],
                    "actions": range(n_s, n_s + n_a), "rewards": [n_s + n_a], "terminations": [2 * n_s + n_a + 1]}
            bad = [k for k, c in cols.items() if not np.isfinite(x[:, list(c)]).all()]
            fail(f"dataset {ds_id} holds NaN or infinite values (in its {', '.join(bad)}); {regenerate_hint(args)}")
        if record["fingerprint"] not in (None, content):  # after the NaN check, which says more
            fail(f"dataset {ds_id} does not match its fingerprint (stored {record['fingerprint']}, its arrays give "
                 f"{content}): it changed after data_gen.py wrote it; copy it again, or {regenerate_hint(args)}")
        return (x, lens), metas, gap
    tgt_ds = opened[tgt_id][0]
    rows, lens, labels, gaps = [], [], [], []
    for ds_id, (dom, qual, _) in zip(src_ids, parse_source(args.source)):
        ds = opened[ds_id][0]
        if ds.observation_space != tgt_ds.observation_space or ds.action_space != tgt_ds.action_space:
            fail(f"the spaces of {ds_id} ({ds.observation_space}, {ds.action_space}) differ from the target's "
                 f"({tgt_ds.observation_space}, {tgt_ds.action_space})")
        (x, ep_lens), metas, gap = read(ds_id)
        rows.append(x)
        gaps.append(gap)
        for ep_len, meta in zip(ep_lens, metas):
            opts = meta.get("options") or {}  # domain/quality: for diagnostics only, the learner never reads them
            lens += ep_len
            labels += [(opts.get("domain", dom), opts.get("quality", qual))] * len(ep_len)
    ((tgt_x, tgt_lens), _, _), (doms, quals) = read(tgt_id), zip(*labels)
    dom_names, qual_names = sorted(set(doms)), sorted(set(quals))
    t = lambda v, dtype=torch.long: torch.as_tensor(np.asarray(v), dtype=dtype, device=device)
    traj_len, src_x = t(lens), np.concatenate(rows)
    lacking = [i for i, gap in zip(src_ids, gaps) if gap is None]  # made before data_gen.py recorded the gap
    return dict(true_gap=None if lacking else t(np.concatenate(gaps), torch.float32), true_gap_hint=(
                    f"the true dynamics gap of the source rows needs datasets made since data_gen.py records it"
                    f"{' (not ' + ', '.join(lacking) + ')' if lacking else ''}; {regenerate_hint(args)}"),
                data=t(np.concatenate([src_x, tgt_x]), torch.float32), n_src=len(src_x), n_tgt=len(tgt_x), tgt_ds=tgt_ds,
                ds=tgt_ds.observation_space.shape[0], da=tgt_ds.action_space.shape[0], traj_len=traj_len,
                traj_start=torch.cumsum(traj_len, 0) - traj_len, tgt_traj_len=t(sum(tgt_lens, [])),
                traj_id=torch.repeat_interleave(torch.arange(len(lens), device=device), traj_len),
                dom=t([dom_names.index(x) for x in doms]), qual=t([qual_names.index(x) for x in quals]),
                dom_names=dom_names, qual_names=qual_names, records={i: opened[i][1] for i in expected})


# ---- Stage 5's view of the data: normalised states and scaled rewards, computed once -----------------------------
def episode_returns(rewards: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Undiscounted return of each of the consecutive episodes of `lengths` rows that `rewards` holds."""
    episode = torch.repeat_interleave(torch.arange(len(lengths), device=rewards.device), lengths)
    return torch.zeros(len(lengths), dtype=torch.float64, device=rewards.device).index_add_(0, episode, rewards.double())


def data_level(d: dict) -> float:
    """The target data's own level: the mean normalized score of its whole episodes (the last one, cut where the
    dataset is full, is left out unless it is the only one). The reference line a learner on this data should reach."""
    returns = episode_returns(d["data"][d["n_src"]:, d["ds"] + d["da"]], d["tgt_traj_len"]).cpu().numpy()
    whole = returns[:-1] if len(returns) > 1 else returns
    return float(np.mean(minari.get_normalized_score(d["tgt_ds"], whole)) * 100)


def stage5_data(d: dict, normalize_states: bool, reward_scale: str) -> tuple[torch.Tensor, dict]:
    """The rows [s, a, r, s', d] that stage 5 trains on, transformed once here rather than in every step:
    - states s and s' normalised with the mean and std (+ 1e-3) of the TARGET rows: the policy acts in the target env,
      and the statistics must not move with the filter or with the source mixture; evaluation applies the same
      transform to the observation (Learner.policy);
    - rewards times 1000 / (max - min episode return), IQL's scaling for locomotion (Kostrikov et al. 2022), with the
      returns of every episode the run loads, source and target: one scale for every variant of a comparison, and a
      range that a 5-episode target dataset alone would not estimate.
    Stages 1-4 see the raw rows (d["data"]), as the official release. Returns (rows, statistics for the record)."""
    data, ds, da, Ns = d["data"], d["ds"], d["da"], d["n_src"]
    rows, stats = data.clone(), {}
    if normalize_states:
        mean, std = data[Ns:, :ds].mean(0), data[Ns:, :ds].std(0) + 1e-3
        for k in (0, ds + da + 1):  # s, then s'
            rows[:, k: k + ds] = (data[:, k: k + ds] - mean) / std
        stats.update(state_mean=mean.tolist(), state_std=std.tolist())
    if reward_scale == "episode-range":
        returns = torch.cat([episode_returns(data[:Ns, ds + da], d["traj_len"]),
                             episode_returns(data[Ns:, ds + da], d["tgt_traj_len"])])
        scale = 1000.0 / max(float(returns.max() - returns.min()), 1e-6)
        rows[:, ds + da] = data[:, ds + da] * scale
        stats.update(reward_scale_factor=scale, episode_return_range=[float(returns.min()), float(returns.max())])
    return rows, stats


def normalized_observation(stats: dict) -> Callable:
    """The observation transform of stage5_data's statistics, for the evaluation policy (identity without them)."""
    if "state_mean" not in stats:
        return lambda obs: obs
    mean, std = torch.tensor(stats["state_mean"]), torch.tensor(stats["state_std"])
    return lambda obs: (obs - mean) / std


# ---- Loop pieces shared by the stages -----------------------------------------------------------------------------
def gru_last_state(gru: nn.GRU, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """The state of a one-layer batch-first `gru` after each sequence's last valid step: x [B, T, in] padded, lengths
    [B] >= 1 -> [B, hidden]. The same numbers as `gru` on a packed sequence, to float rounding (tests/test_v2a.py). On
    CUDA it is that (cuDNN's fused kernel). On a CPU it runs the recurrence itself: ATen's packed GRU takes each step's input
    gates as a slice of one [sum(lengths), 3 hidden] tensor, and its backward writes a zero-filled copy of the whole
    tensor for every step, T copies per call; here the gates are split once (one concatenation in the backward), and
    stage 1's GRU forward and backward run ≈1.4x faster on one thread."""
    if x.is_cuda:
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        return gru(packed)[1][0]
    order = torch.argsort(lengths, descending=True, stable=True)  # the sequences still running at step t: a prefix
    lens, xs, hid = lengths[order], x[order], gru.hidden_size
    active = (lens[None, :] > torch.arange(int(lens[0]), device=x.device)[:, None]).sum(1).tolist()  # per step
    steps = torch.cat([xs[:n, t] for t, n in enumerate(active)])  # time-major packed rows
    gates_in = torch.addmm(gru.bias_ih_l0, steps, gru.weight_ih_l0.t()).split(active)
    w_hh_t, h, done = gru.weight_hh_l0.t(), x.new_zeros(len(lens), hid), []
    for gi, n in zip(gates_in, active):
        if n < len(h):  # the sequences that ended at the previous step keep their state
            done.append(h[n:])
            h = h[:n]
        gi_rz, gi_n = gi.split([2 * hid, hid], 1)
        gh_rz, gh_n = torch.addmm(gru.bias_hh_l0, h, w_hh_t).split([2 * hid, hid], 1)
        r, z = torch.sigmoid(gi_rz + gh_rz).chunk(2, 1)  # reset and update gates
        cand = torch.tanh(gi_n + r * gh_n)
        h = cand + z * (h - cand)  # (1 - z) cand + z h, in the order ATen computes it
    done.append(h)
    return torch.cat(done[::-1])[torch.argsort(order)]


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


def compiled(fn, args, dev: torch.device, opts: tuple = (), static: tuple = ()):
    """`fn` compiled by torch.compile when --compile. For stage 5, `fn` is the whole update (batch draw, forward,
    gradients by grad_and_value, Adam steps by adam_step_, target update), so inductor fuses its elementwise work around
    the matmuls and one compiled call replaces some hundred Python-level operator calls. On CUDA, mode
    reduce-overhead replays it as a CUDA graph; the tensors that it updates in place beyond the modules' parameters
    (the state of `opts`, read at the first call, after a checkpoint has been loaded, and `static`) are marked
    static there, so that the graph can be captured. Compiled code draws the same random numbers as eager code
    (fallback_random). fullgraph: a graph break raises instead of silently running part of the update eagerly (a
    non-tensor aux in grad_and_value once made TD3+BC's actor steps fall back to eager, 30 % slower)."""
    if not args.compile:
        return fn
    torch._inductor.config.fallback_random = True
    if dev.type == "cuda" and tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2]) < (2, 13):
        # torch 2.11's inductor asserts in its loop reordering (reorder_loops_by_dep_pair) on this update on CUDA, seen on
        # an H100; 2.13, the pinned version, declines the reordering there instead. Off, the update compiles (docs/speed.md)
        torch._inductor.config.loop_ordering_after_fusion = False
    fn_c = torch.compile(fn, dynamic=False, fullgraph=True, mode="reduce-overhead" if dev.type == "cuda" else None)
    marked = []

    def call(*a, **kw):
        if dev.type == "cuda" and not marked:
            for t in [t for o in opts for st in o.state.values() for t in st.values()] + list(static):
                torch._dynamo.mark_static_address(t)
            marked.append(True)
        try:
            return fn_c(*a, **kw)
        except torch._dynamo.exc.Unsupported as e:  # a fork's change that dynamo cannot trace into the one graph
            first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
            raise RuntimeError(f"the stage-5 update no longer compiles as one graph (--compile uses fullgraph=True): "
                               f"{first}. Run with --no-compile, or find the break with TORCH_LOGS=graph_breaks") from e
        except torch._dynamo.exc.BackendCompilerFailed as e:  # a compiler bug: nothing of the update has run yet
            first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
            raise RuntimeError(f"torch {torch.__version__} failed to compile the stage-5 update ({first}). The earlier "
                               "stages are saved: run the same command again with --resume runs/<this run> --no-compile (the "
                               "same results, slower)") from e

    return call


def params(net: nn.Module) -> dict:
    """`net`'s parameters by name: the form in which torch.func.functional_call and torch.func.grad take them."""
    return dict(net.named_parameters())


def grad_and_value(loss_fn: Callable, params, *args):
    """(gradients of loss_fn(params, *args)'s loss with respect to `params`, in its form (a dict of parameters, or a
    tuple of them), (loss, aux)); loss_fn returns (loss, aux). Inside torch.compile: torch.func.grad_and_value, which
    dynamo traces into the update's graph (torch.autograd.grad would break it). Eager: torch.autograd.grad, which
    runs there at twice the rate of torch.func's transforms. Both give the same gradients (tests/test_v2a.py)."""
    if torch.compiler.is_compiling():
        return torch.func.grad_and_value(loss_fn, has_aux=True)(params, *args)
    groups = params if isinstance(params, tuple) else (params,)
    with torch.enable_grad():
        loss, aux = loss_fn(params, *args)
        grads = iter(torch.autograd.grad(loss, [p for g in groups for p in g.values()]))
    by_name = tuple({k: next(grads) for k in g} for g in groups)
    return (by_name if isinstance(params, tuple) else by_name[0]), (loss.detach(), aux)


def init_adam_state(opt: torch.optim.Adam) -> torch.optim.Adam:
    """Create the state that torch.optim.Adam creates at its first step (step counter, first and second moments), so
    that adam_step_ can run inside a compiled function from the first step; load_state_dict replaces it as usual."""
    for p in opt.param_groups[0]["params"]:
        opt.state[p] = {"step": torch.zeros((), device=p.device), "exp_avg": torch.zeros_like(p),
                        "exp_avg_sq": torch.zeros_like(p)}
    return opt


def cosine_lr(opt: torch.optim.Adam, steps: int) -> torch.optim.lr_scheduler.CosineAnnealingLR:
    """The learning rate of `opt` cosine-annealed to 0 over `steps` scheduler steps (IQL's actor). adam_step_ takes
    the place of opt.step(), which the scheduler expects to see called before its first step: that warning is moot."""
    warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before `optimizer.step\(\)`")
    return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)


@torch.no_grad()
def adam_step_(opt: torch.optim.Adam, grads: dict):
    """torch.optim.Adam's update (no weight decay, no amsgrad; lr may be a tensor) of `opt`'s parameters with `grads`
    (a dict in their order, as torch.func.grad returns it), written with foreach ops: it compiles into the surrounding
    update, where opt.step() would break the graph. It reads and writes Adam's own state (init_adam_state), so
    state_dict, lr schedulers and checkpoints work unchanged; the arithmetic is fused Adam's up to float rounding."""
    group, g = opt.param_groups[0], list(grads.values())
    (beta1, beta2), eps, lr = group["betas"], group["eps"], group["lr"]
    state = [opt.state[p] for p in group["params"]]
    steps, exp_avg, exp_avg_sq = ([st[k] for st in state] for k in ("step", "exp_avg", "exp_avg_sq"))
    torch._foreach_add_(steps, 1)
    torch._foreach_lerp_(exp_avg, g, 1 - beta1)
    torch._foreach_mul_(exp_avg_sq, beta2)
    torch._foreach_addcmul_(exp_avg_sq, g, g, value=1 - beta2)
    # every parameter's counter has the same value; the bias corrections in float64 as fused Adam computes them (in
    # float32, 1 - 0.999^t loses five digits to cancellation)
    step = steps[0].double()
    bias_correction1, bias_correction2_sqrt = 1 - beta1**step, (1 - beta2**step).sqrt()
    denom = torch._foreach_add(torch._foreach_div(torch._foreach_sqrt(exp_avg_sq), bias_correction2_sqrt), eps)
    update = torch._foreach_div(exp_avg, denom)
    torch._foreach_mul_(update, lr / bias_correction1)
    torch._foreach_sub_(group["params"], update)


def save(obj: dict, path: str):
    """A checkpoint, replaced whole or not at all (write_whole: an interrupted save leaves the previous one intact).
    Serialised in memory first: torch.save into a full disk reports only 'unexpected pos ...', a file's write ENOSPC."""
    try:
        buf = io.BytesIO()
        torch.save(obj, buf)
        write_whole(path, buf.getbuffer())
    except (OSError, RuntimeError) as e:  # torch.save reports a file it cannot write as a RuntimeError
        fail(f"cannot write {path} ({why(e)}); the checkpoints written before are intact: make room or make "
             f"{os.path.dirname(path) or '.'} writable, then continue the run with --resume {os.path.dirname(path)}")


# ---- Diagnostics of the method at work (the paper's Fig. 2): z per domain, the dynamics score per domain ------------
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


def domain_probe(z: torch.Tensor, dom: torch.Tensor, n_dom: int, seed: int) -> float:
    """Held-out (20 % of the rows) nearest-centroid probe of the domain label on z, as balanced accuracy (mean
    per-domain recall, chance 1/n_dom)."""
    z, dom = z.cpu(), dom.cpu()
    perm = torch.randperm(len(z), generator=torch.Generator().manual_seed(seed))
    test, train = perm[: max(1, len(z) // 5)], perm[max(1, len(z) // 5) :]
    cents = torch.stack([z[train][dom[train] == k].mean(0) for k in range(n_dom)]).nan_to_num(1e6)
    pred = torch.cdist(z[test], cents).argmin(1)
    return float(np.mean([(pred[dom[test] == k] == k).float().mean() for k in range(n_dom) if (dom[test] == k).any()]))


def z_diagnostics(z: torch.Tensor, d: dict, writer: SummaryWriter, seed: int):
    """The domain probe on the z of every trajectory (domain_probe), and a projector embedding of z labelled
    domain/quality."""
    z, dom, qual, n_dom = z.cpu(), d["dom"].cpu(), d["qual"].cpu(), len(d["dom_names"])
    acc = domain_probe(z, dom, n_dom, seed)
    perm = torch.randperm(len(z), generator=torch.Generator().manual_seed(seed))
    writer.add_scalar("repr/domain_probe_acc", acc, 0)
    print(f"[stage 2 relabel] {len(z)} trajectories; held-out domain probe acc {acc:.3f} (chance {1 / n_dom:.3f})")
    sel = torch.cat([perm[dom[perm] == k][: 2000 // n_dom] for k in range(n_dom)])  # balanced subsample
    labels = [f"{d['dom_names'][dom[i]]}/{d['qual_names'][qual[i]]}" for i in sel.tolist()]
    writer.add_embedding(z[sel], metadata=labels, tag="z")


# ---- The context every stage of a run reads ------------------------------------------------------------------------
@dataclass
class Run:
    """What every stage needs: the flags, the data (load_data), the device, the run directory and its TensorBoard
    writer, each stage's key (what determined its result), the checkpoints this run continues from (stage ->
    (path, checkpoint), from load_checkpoints), the variant's stages before stage 5, the paper's row (e.g. v2a-otdf)
    and under --bench the machine's matmul rate."""

    args: object
    d: dict
    dev: torch.device
    dir: str
    writer: SummaryWriter
    keys: dict
    loaded: dict
    stages: tuple
    row: str
    mm_rate: float = 0.0
    results: dict = field(default_factory=dict)  # what the stages add to results.json (e.g. the filter's accuracy)

    @property
    def bench(self) -> bool:
        return self.args.bench > 0

    def checkpoint(self, k: int) -> Optional[dict]:
        """Stage k's checkpoint from this run (--resume) or, for k <= 4, from the --reuse-stages run (both checked
        against the stage's key before anything ran); None: the stage runs."""
        if k in self.loaded:
            print(f"[stage {k}] loaded {self.loaded[k][0]}", flush=True)
            return self.loaded[k][1]

    def save(self, k: int, **state):
        """Stage k's checkpoint, with its key, in the run directory."""
        save(dict(state, key=self.keys[k]), os.path.join(self.dir, f"stage{k}.pt"))

    def adam(self, params, **kwargs) -> torch.optim.Adam:
        return torch.optim.Adam(params, **{"lr": self.args.learning_rate, "fused": True, **kwargs})

    def train(self, name: str, steps: int, step_fn, tags: list, log_every: int, bench_steps: int, warmup: int,
              after_step: Optional[Callable] = None) -> bool:
        """Stage training: step_fn(i) for i = 1..steps with logging (run_stage), after_step(i) after each step. Under
        --bench it times `bench_steps` steps after `warmup` instead (bench_stage) and returns False: nothing trained."""
        if self.bench:
            bench_stage(name, step_fn, bench_steps, warmup, self.mm_rate)
            return False
        run_stage(name, steps, step_fn, tags, self.writer, log_every, after_step=after_step)
        return True


def start_run(args, script: str, d: dict, dev: torch.device, stages: tuple, keys: dict, row: str, hparams: dict,
              crop_steps: float) -> Run:
    """The checkpoints this run continues from (each checked against its stage key before anything is written), then
    the run directory runs/<env>__<exp>__<row>__<seed>__<time> (or --resume's; a temporary one under --bench), its
    TensorBoard writer and args.json: the flags, `hparams` and the datasets' generation records. `crop_steps`: the
    mean trajectory steps of a TC-ELBO iteration, for the time estimate."""
    bench = args.bench > 0
    mm_rate = matmul_rate(dev) if bench else 0.0
    if bench:
        print(f"bench: device {dev}, {torch.get_num_threads()} threads, fp32 192x256x256 matmul {mm_rate:.0f} GFLOP/s, "
              f"the estimate's machine probe {machine_probe(dev):.1f} it/s; stages are timed on untrained networks",
              flush=True)
    threads = torch.get_num_threads()
    cpu_threads = f", {threads} CPU thread{'s' * (threads > 1)} (--threads)" if dev.type == "cpu" else ""
    print(f"data: {d['n_src']} source transitions in {len(d['traj_len'])} trajectories ({', '.join(d['dom_names'])}), "
          f"{d['n_tgt']} target transitions; device {dev}{cpu_threads}", flush=True)
    loaded = {} if bench else load_checkpoints(args, stages, keys, dev)
    run_dir = (args.resume.rstrip("/") if args.resume else tempfile.mkdtemp(prefix="v2a_bench_") if bench
               else f"runs/{args.env_id}__{args.exp_name}__{row}__{args.seed}__{int(time.time())}")
    # the code too: a run started outside benchmark.py (which records it per attempt) would otherwise name none
    hparams = {**vars(args), "script": script, **hparams, "device": str(dev), "datasets": d["records"],
               "code": code_version(os.path.dirname(os.path.abspath(__file__)))}
    made = False  # whether this process made the run folder (a new run; --resume's folder was locked by check_resume)
    try:  # the run's first writes: a folder that cannot be written stops it here, in one line, before anything trains
        if not (args.resume or bench):
            run_dir, made = new_run_folder(run_dir), True
        if args.resume:  # what this process computes again is logged again: drop it from the event files first
            cut_events(run_dir, {0: -1, **{k: math.inf if k in loaded else -1 for k in (1, 2, 3, 4)},
                                 5: loaded[5][1]["step"] if 5 in loaded else -1})
        if args.track:
            import wandb
            wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, sync_tensorboard=True,
                       config=vars(args), name=os.path.basename(run_dir), save_code=True)
        writer = SummaryWriter(run_dir)
        writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in hparams.items()))
        write_whole(os.path.join(run_dir, "args.json"), json.dumps(hparams, indent=1))  # a resumed run keeps its own
    except OSError as e:
        if made:  # a new run without its args.json cannot be resumed: it leaves nothing
            shutil.rmtree(run_dir, ignore_errors=True)
        fail(f"cannot write the run folder {run_dir} ({why(e)}); " +
             ("make room or make it writable, or copy it to a writable place and --resume the copy" if args.resume else
              "make room, or start the run from a folder where it can write: runs/ is made in the working directory"))
    if not bench:
        command = resume_command(script, run_dir)
        print(f"run folder: {run_dir}; if it stops, continue it with: {command}", flush=True)
        speed = machine_speed(dev) if dev.type == "cpu" else 1.0  # a GPU's stages scale unevenly: they print their ETAs
        print(estimate(args, script, stages, loaded, dev, crop_steps, speed), flush=True)
        stop_with_resume_command(command)
    return Run(args, d, dev, run_dir, writer, keys, loaded, stages, row, mm_rate)


def resume_command(script: str, run_dir: str) -> str:
    """The command that continues the run in run_dir, from the working directory it was started in."""
    prog = sys.argv[0] if os.path.basename(sys.argv[0]) == script else script  # as typed: another folder's script too
    return f"python {shlex.quote(prog)} --resume {shlex.quote(run_dir)}"


def stop_with_resume_command(command: str):
    """From here on, Ctrl-C and SIGTERM (a scheduler's, kill's: by default a silent exit 143) raise a KeyboardInterrupt
    that carries the command continuing the run; the scripts' __main__ prints it as their one-line error. Every
    checkpoint written so far is intact (atomic saves)."""
    def stop(signum, _frame):
        raise KeyboardInterrupt(f"{signal.Signals(signum).name}: stopped; continue the run with {command} (stage 5 "
                                f"restarts from its last evaluation, an unfinished earlier stage from its beginning)")
    for sig in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(sig) is not signal.SIG_IGN:  # a background job's ignored Ctrl-C stays ignored
            signal.signal(sig, stop)


# ---- Stage 5's loop, the same for every backbone ------------------------------------------------------------------
def has_source_rows(args) -> bool:
    """Whether stage-5 batches hold source rows (before their last batch_size target rows): all variants but target."""
    return args.variant not in ("target", "bc")


def value_tags(args, kinds: tuple) -> list:
    """TensorBoard tags of batch_value_means, e.g. charts/q_target_rows: the critics' scale on the target rows and,
    where batches hold any, on the source rows (a diagnostic of value drift on the source data)."""
    rows = ["target_rows"] + (["source_rows"] if has_source_rows(args) else [])
    return [f"charts/{kind}_{r}" for r in rows for kind in kinds]


def batch_value_means(values: tuple, args) -> list:
    """Means of each of `values` (one number per batch row) over a stage-5 batch's target rows (its last batch_size
    rows) and, where it has any, over the source rows before them, in the order of value_tags."""
    n = args.batch_size
    means = [v[-n:].mean() for v in values]
    return means + ([v[:-n].mean() for v in values] if has_source_rows(args) else [])


class Learner(NamedTuple):
    """A stage-5 backbone: its networks, optimizers and lr schedules (checkpointed), the names of the losses that
    `step(i)` returns stacked, `policy()`, a CPU copy of the deterministic policy for evaluation, and `q_values(rows)`,
    the critics' min Q of rows [s, a, ...] (None: no critic), which v2a_stability.ValueWatch logs."""

    nets: dict
    opts: list
    scheds: list
    loss_tags: list
    step: Callable[[int], torch.Tensor]
    policy: Callable[[], Callable]
    q_values: Optional[Callable] = None


def train_policy(run: Run, learner: Learner, name: str, diagnostics: Optional[Callable] = None):
    """Runs learner.step for --total-steps steps (continuing a --resume checkpoint); every --eval-freq steps and
    after the last: evaluation in the target env and a checkpoint of the whole state (networks, optimizers, RNGs).
    diagnostics(step, generator), if given, runs at every log and evaluation step with its own RNG, so that training
    is the same for any --log-freq. Writes results.json: the (step, return, normalized score) of every evaluation."""
    args, dev = run.args, run.dev
    if run.bench:
        bench_stage(f"stage 5 {name} updates ({'compiled' if args.compile else 'eager'})", learner.step,
                          args.bench, 100, run.mm_rate)
        return
    diag_gen = torch.Generator(device=dev).manual_seed(args.seed)  # its own RNG: training is the same for any --log-freq
    start, evals, eval_returns = 0, [], []
    if (ck := run.checkpoint(5)) is not None:
        for key, net in learner.nets.items():
            net.load_state_dict(ck[key])
        for opt, state in zip(learner.opts, ck["opts"]):
            opt.load_state_dict(state)
        for sched, state in zip(learner.scheds, ck["scheds"]):
            sched.load_state_dict(state)
            sched.T_max = args.total_steps  # a finished run can be extended with a larger --total-steps
        setters = (torch.set_rng_state, np.random.set_state, random.setstate, torch.cuda.set_rng_state_all)
        for set_state, state in zip(setters, ck["rng"]):
            if state is not None:
                set_state(state)
        diag_gen.set_state(ck["diag_rng"])
        start, evals, eval_returns = ck["step"], ck["evals"], ck.get("eval_returns", [])
        print(f"[stage 5] resuming from step {start}", flush=True)
    eval_env = run.d["tgt_ds"].recover_environment(eval_env=True)
    is_eval_step = lambda i: i % args.eval_freq == 0 or i == args.total_steps
    normalized = lambda returns: minari.get_normalized_score(run.d["tgt_ds"], returns) * 100

    watch = ValueWatch(run.d, run.d["stage5_rows"], args.gamma, args.seed) if learner.q_values else None

    def after_step(step: int):  # run_stage has just read (and checked) the losses if step % log_freq == 0 or eval step
        if diagnostics and (step % args.log_freq == 0 or is_eval_step(step)):
            diagnostics(step, diag_gen)
        if watch and (step % args.log_freq == 0 or is_eval_step(step)):
            watch.log(learner.q_values, run.writer, step)
        if is_eval_step(step):
            returns = evaluate(learner.policy(), eval_env, args.eval_episodes, args.seed + PERIODIC_EVAL_SEED)
            score = float(np.mean(normalized(returns)))
            run.writer.add_scalar("eval/return", returns.mean(), step)
            run.writer.add_scalar("eval/normalized_score", score, step)
            evals.append((step, float(returns.mean()), score))
            eval_returns.append(returns.tolist())
            print(f"[eval] step {step}: return {returns.mean():.1f} +- {returns.std():.1f}, normalized score {score:.1f}")
            rng = (torch.get_rng_state(), np.random.get_state(), random.getstate(),
                   torch.cuda.get_rng_state_all() if dev.type == "cuda" else None)
            run.save(5, step=step, **{k: net.state_dict() for k, net in learner.nets.items()}, rng=rng, evals=evals,
                     eval_returns=eval_returns, opts=[o.state_dict() for o in learner.opts],
                     scheds=[s.state_dict() for s in learner.scheds],
                     diag_rng=diag_gen.get_state())

    run_stage(f"stage 5 {name}", args.total_steps, learner.step, learner.loss_tags, run.writer, args.log_freq,
              start=start, sps_tag="charts/SPS", must_log=is_eval_step, after_step=after_step)
    if evals:
        final, level = final_evaluation(run, learner, eval_env, normalized), data_level(run.d)
        write_results(run.dir, {"variant": args.variant, "dynamics_score": args.dynamics_score, "row": run.row,
                                **run.results,
                                "final_normalized_score": final["normalized_score"],
                                "last_eval_normalized_score": evals[-1][2], "target_data_normalized_score": level,
                                "final_eval": final, "evals": evals, "eval_returns": eval_returns})
        print(f"done: {run.dir}  final score (the {final['episodes']}-episode evaluation of the last policy) "
              f"{final['normalized_score']:.1f} +- {np.std(final['normalized_scores']) / len(final['returns'])**0.5:.1f} "
              f"(s.e.); the target data's own level {level:.1f}", flush=True)
    eval_env.close()


def finish_filter_only(run: Run):
    """--filter-only: results.json holds what stages 1-4 and the filter measured (run.results), and no score."""
    args = run.args
    write_results(run.dir, {"variant": args.variant, "dynamics_score": args.dynamics_score, "row": run.row,
                            "filter_only": True, **run.results})
    run.writer.close()
    print(f"done: {run.dir}  --filter-only: stages 1-4 and the filter's accuracy in results.json; no policy trained "
          f"(continue into stage 5 with --resume {run.dir} --no-filter-only)", flush=True)


def write_results(run_dir: str, results: dict):
    """results.json, written whole or not at all; on a full disk or a read-only folder, one line that says how to
    get it: the stage-5 checkpoint holds the last policy, so --resume repeats only the final evaluation."""
    path = os.path.join(run_dir, "results.json")
    try:
        write_whole(path, json.dumps(results, indent=1))
    except OSError as e:
        fail(f"cannot write {path} ({why(e)}); training is done and its checkpoint is intact: make room or make "
             f"{run_dir} writable, then write it with --resume {run_dir} (it repeats only the final evaluation)")


PERIODIC_EVAL_SEED, FINAL_EVAL_SEED = 10_000, 1_000_000  # episode seeds: seed + these + episode (distinct sets)


def final_evaluation(run: Run, learner: Learner, env, normalized: Callable) -> dict:
    """The run's score: --final-eval-episodes episodes of the last policy, on episode seeds that no periodic evaluation
    uses. A 10-episode evaluation has a standard error near 7 normalized points on Hopper; 50 episodes cut it to ~3."""
    args = run.args
    returns = evaluate(learner.policy(), env, args.final_eval_episodes, args.seed + FINAL_EVAL_SEED)
    scores = normalized(returns)
    run.writer.add_scalar("eval/final_normalized_score", float(np.mean(scores)), args.total_steps)
    record = dict(step=args.total_steps, episodes=len(returns), seed=args.seed + FINAL_EVAL_SEED, returns=returns.tolist(),
                  normalized_scores=scores.tolist(), normalized_score=float(np.mean(scores)))
    record["return"] = float(returns.mean())
    return record
