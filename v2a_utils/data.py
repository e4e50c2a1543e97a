# The data of a training run: the Minari datasets that the flags name, checked against their generation record and made
# by data_gen.py (as a child process) where missing, read once into one device matrix of rows [s, a, r, s', d] (source
# rows first, then target rows) with each source row's trajectory, domain, quality and true dynamics gap; and stage 5's
# view of those rows (normalised states, scaled rewards), computed once. docs: docs/v2a_iql.md ("Reading the code")
import json
import os
import signal
import subprocess
import sys
from typing import Callable

import minari
import numpy as np
import torch
from minari.storage import get_dataset_path

from v2a_utils.data_truth import flatten, stored_provenance
from v2a_utils.errors import fail, one_line
from v2a_utils.flags import expected_generation, parse_source
from v2a_utils.processes import child_error, datasets_root
from v2a_utils.repository import ROOT


def split(x: torch.Tensor, ds: int, da: int):
    """The columns s, a, r, s', d of rows x [..., 2 ds + da + 2] (a view each: no copy)."""
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
        child = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, text=True,
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
        line, output = child_error(child.returncode, err, datasets_root())
        sys.stderr.write(output)  # another crash: its traceback, which the user needs
        fail(line)


def load_data(args, device: torch.device) -> dict:
    """Checks the datasets the flags name (runs data_gen.py for missing ones), their spaces and that they hold what the
    flags need (--oracle: the true gap), and moves everything to the device once."""
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
    # A row's labels are its entry's domain and quality, also where another domain's policy collected it (`@`): the
    # domain is the dynamics its rows follow (the true gap's), the quality the behaviour label of the filters' truth.
    for ds_id, (dom, qual, *_) in zip(src_ids, parse_source(args.source)):
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
    gap_hint = (f"the true dynamics gap of the source rows needs datasets made since data_gen.py records it"
                f"{' (not ' + ', '.join(lacking) + ')' if lacking else ''}; {regenerate_hint(args)}")
    if args.oracle != "none" and lacking:
        fail(f"--oracle needs the true dynamics gap of every source row, which these datasets do not record (made "
             f"before data_gen.py recorded it); {gap_hint}")
    return dict(true_gap=None if lacking else t(np.concatenate(gaps), torch.float32), true_gap_hint=gap_hint,
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
