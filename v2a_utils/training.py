# A training run at work, the same for both scripts and every backbone: the context every stage reads (Run: flags,
# data, device, run folder, writer, the checkpoints it continues from), its start (start_run: the checks of what it
# loads, the folder, args.json, the time estimate), the logged loop of every stage (run_stage), and stage 5's loop with
# its evaluations, checkpoints and results.json (train_policy). Nothing here changes what a run computes.
# docs: docs/v2a_iql.md ("Reading the code")
import json
import math
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Optional

import minari
import numpy as np
import torch
from torch.utils.tensorboard import SummaryWriter

from v2a_utils.data import data_level
from v2a_utils.errors import fail, why
from v2a_utils.repository import code_version
from v2a_utils.runs import (
    cut_events,
    load_checkpoints,
    new_run_folder,
    resume_command,
    save,
    stop_with_resume_command,
    write_whole,
)
from v2a_utils.stability import ValueWatch
from v2a_utils.timing import bench_stage, estimate, machine_probe, machine_speed, matmul_rate


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
               "code": code_version()}
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
        stop_with_resume_command(command, run_dir)
    return Run(args, d, dev, run_dir, writer, keys, loaded, stages, row, mm_rate)


# ---- The logged loop of every stage ---------------------------------------------------------------------------------
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
    the critics' min Q of rows [s, a, ...] (None: no critic), which stability.ValueWatch logs."""

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
