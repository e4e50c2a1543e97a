# The behaviour policies that collect the source and target data: where they are stored (policies/<robot>/<domain>.pt,
# committed), loading one, acting and evaluating with it in a domain, measuring each mixture entry's policy
# (`python data_gen.py --measure-episodes N`), and training a domain's policies with SAC (`python data_gen.py
# --train-domain DOMAIN`); `args` is data_gen.py's flags throughout. docs: docs/data_gen.md ("Behaviour policies")
# torch only where a policy runs (its networks are in sac.py): data_gen.py imports this module, and must load the
# shifted envs without torch.
import os
import time
from typing import TYPE_CHECKING, Optional

import gymnasium as gym
import numpy as np

from v2a_utils.errors import DataGenError, one_line
from v2a_utils.mixtures import Entry, entry_label, parse_source
from v2a_utils.repository import ROOT
from v2a_utils.shifts import make_domain_env

if TYPE_CHECKING:
    from v2a_utils.sac import Actor

SAC_WARMUP_STEPS = 5000  # uniform-random steps before SAC's first update (a tenth of the run when that is less)
POLICY_TRAINING_TIME = "SAC 300k steps, about 45-60 min on one core of this 2-core CPU"
POLICY_DIR = os.path.join(ROOT, "policies")  # the committed policies, found from any working directory


def policy_path(args, robot: str, domain: str) -> str:
    """The file of `domain`'s behaviour policies: in --policy-dir, or the committed one."""
    return os.path.join(POLICY_DIR if args.policy_dir is None else args.policy_dir, robot.lower(), f"{domain}.pt")


def train_command(args, domain: str) -> str:
    script = "data_gen.py" if os.path.abspath(os.getcwd()) == ROOT else os.path.join(ROOT, "data_gen.py")
    cmd = f"python {script} --env-id {args.env_id} --train-domain {domain}"
    return cmd if args.policy_dir is None else f"{cmd} --policy-dir {args.policy_dir}"


def load_actor(args, robot: str, domain: str, quality: str) -> tuple[Optional["Actor"], dict]:
    """The committed behaviour policy `quality` of `domain` (None for the uniform random policy)."""
    if quality == "random":
        return None, {}
    path = policy_path(args, robot, domain)
    if not os.path.exists(path):
        raise DataGenError(f"no behaviour policy {path}; train it with: {train_command(args, domain)}  "
                           f"({POLICY_TRAINING_TIME})")
    import torch

    from v2a_utils.sac import Actor
    try:
        record = torch.load(path, weights_only=False)
        actor = Actor(record["obs_dim"], record["act_dim"])
        actor.load_state_dict(record[quality]["state_dict"])
    except Exception as e:
        raise DataGenError(f"behaviour policy file {path} cannot be read ({one_line(e)}); train it again with: "
                           f"{train_command(args, domain)}") from None
    return actor, record[quality]


def policy_act(actor: Optional["Actor"], obs: np.ndarray, env: gym.Env, rng: np.random.Generator,
               deterministic: bool) -> np.ndarray:
    """Action of a behaviour policy; `actor=None` is the uniform random policy."""
    if actor is None:
        return rng.uniform(env.action_space.low, env.action_space.high).astype(np.float32)
    import torch  # an actor exists, so torch is already imported: this is a dictionary look-up
    with torch.inference_mode():
        return actor.act(obs, deterministic)  # forward()'s action, bit for bit, in about half the time


def evaluate_policy(env: gym.Env, actor: Optional["Actor"], episodes: int, seed: int,
                    deterministic: bool = True) -> np.ndarray:
    """Undiscounted returns of deterministic (mean-action) episodes, or of sampled actions as the data are collected
    (their noise then comes from torch's global RNG: seed it first)."""
    rng, returns = np.random.default_rng(seed), []
    for ep in range(episodes):
        obs, _ = env.reset(seed=seed + ep)
        done, ret = False, 0.0
        while not done:
            obs, r, term, trunc, _ = env.step(policy_act(actor, obs, env, rng, deterministic=deterministic))
            ret, done = ret + float(r), term or trunc
        returns.append(ret)
    return np.array(returns)


def reference_scores(args, robot: str) -> tuple[float, float]:
    """The target's `ref_min_score` and `ref_max_score`, measured as the target dataset stores them (same seeds)."""
    eval_env = make_domain_env(args.env_id, "nominal")
    expert, _ = load_actor(args, robot, "nominal", "expert")
    ref_min = evaluate_policy(eval_env, None, args.ref_min_episodes, seed=args.seed + 123).mean()
    ref_max = evaluate_policy(eval_env, expert, args.ref_max_episodes, seed=args.seed + 456).mean()
    return float(ref_min), float(ref_max)


def missing_policy(args, robot: str, path: str, policy: str, entries: list) -> str:
    """One missing policy file: the command that trains it and, for entries of a shifted domain, the nominal policy as
    their documented stand-in (`@nominal`: docs/data_gen.md, "Another domain's policy")."""
    hint = f"{path} (train it: {train_command(args, policy)}"
    stand_ins = [entry_label(e.domain, e.quality, e.weight, "nominal") for e in entries if e is not None]
    if policy != "nominal" and stand_ins and os.path.exists(policy_path(args, robot, "nominal")):
        hint += f"; or collect with the nominal policy instead: {','.join(stand_ins)}"
    return hint + ")"


def check_policies(args, robot: str, needs: list[tuple[str, str, Optional[Entry]]]):
    """Every behaviour policy in `needs` ((policy domain, quality, the mixture entry it collects or None), ...) exists
    and loads, before any work: every missing file in one line, each with how to get it."""
    missing: dict[tuple[str, str], list] = {}
    for policy, quality, entry in dict.fromkeys(needs):
        path = policy_path(args, robot, policy)
        if quality != "random" and not os.path.exists(path):
            missing.setdefault((path, policy), []).append(entry)
        else:
            load_actor(args, robot, policy, quality)
    if missing:
        raise DataGenError("missing behaviour policies: "
                           + "; ".join(missing_policy(args, robot, p, d, es) for (p, d), es in missing.items())
                           + f"; each takes {POLICY_TRAINING_TIME}, and resumes from its last evaluation if stopped")


def measure(args, robot: str) -> list[dict]:
    """`--measure-episodes N`: the return of each mixture entry's behaviour policy in the entry's domain (the policy of
    that domain, or of the domain its `@` names), on N episodes (reset seeds 20000 + seed onwards), with deterministic
    actions and with sampled ones (as the data are collected), and its normalized score 100 (R - ref_min) /
    (ref_max - ref_min) against the target's reference scores."""
    import torch

    n, seed = args.measure_episodes, 20_000 + args.seed
    entries = list(dict.fromkeys(parse_source(args.source)))
    # every policy file first (the nominal expert's too: the reference scores): a missing one stops before any episode
    check_policies(args, robot, [(e.policy, e.quality, e) for e in entries] + [("nominal", "expert", None)])
    t0 = time.time()
    ref_min, ref_max = reference_scores(args, robot)
    norm = lambda r: 100 * (r - ref_min) / (ref_max - ref_min)
    print(f"{args.env_id} target reference scores: ref_min_score {ref_min:.1f} (uniform random policy, "
          f"{args.ref_min_episodes} episodes), ref_max_score {ref_max:.1f} (nominal expert, {args.ref_max_episodes} "
          f"deterministic episodes)")
    print(f"returns of each entry's behaviour policy in the entry's domain, {n} episodes (reset seeds {seed}-{seed + n - 1}),"
          f" mean +- sd (normalized score)")
    labels = [entry_label(e.domain, e.quality, 1.0, e.policy) for e in entries]  # domain:quality[@policy]
    width = max([24] + [len(x) for x in labels])
    print(f"  {'domain:quality':{width}s} {'deterministic actions':>30s} {'sampled actions (as collected)':>32s}")
    rows = []
    for e, label in zip(entries, labels):
        env = make_domain_env(args.env_id, e.domain)
        actor, _ = load_actor(args, robot, e.policy, e.quality)
        det = evaluate_policy(env, actor, n, seed=seed)
        torch.manual_seed(seed)
        sampled = evaluate_policy(env, actor, n, seed=seed, deterministic=False)
        rows.append(dict(domain=e.domain, quality=e.quality, policy=e.policy, deterministic=det, sampled=sampled))
        cell = lambda r: f"{r.mean():8.1f} +- {r.std():6.1f} ({norm(r.mean()):5.1f})"
        print(f"  {label:{width}s} {cell(det):>30s} {cell(sampled):>32s}", flush=True)
    print(f"measured in {time.time() - t0:.0f} s")
    return rows


def train_behaviour_policies(args, robot: str, domain: str):
    """SAC in one domain; every `policy_eval_freq` steps the actor is evaluated and kept. The expert is the best
    checkpoint, the medium the checkpoint whose return is closest to 40% of the expert's (our choice of "medium"),
    both re-evaluated on 10 fresh episodes before they are saved."""
    import torch
    import torch.nn.functional as F

    from v2a_utils.sac import Actor, TwinQ

    env, eval_env = make_domain_env(args.env_id, domain), make_domain_env(args.env_id, domain)
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    actor, qf = Actor(obs_dim, act_dim), TwinQ(obs_dim, act_dim)
    qf_target = TwinQ(obs_dim, act_dim)
    qf_target.load_state_dict(qf.state_dict())
    actor_opt = torch.optim.Adam(actor.parameters(), lr=3e-4)
    q_opt = torch.optim.Adam(qf.parameters(), lr=1e-3)
    log_alpha = torch.zeros(1, requires_grad=True)
    alpha_opt = torch.optim.Adam([log_alpha], lr=1e-3)
    target_entropy = -float(act_dim)
    gamma, tau, batch_size = 0.99, 0.005, 256
    n = args.policy_steps
    buf = {k: np.zeros((n, d), np.float32) for k, d in
           [("obs", obs_dim), ("act", act_dim), ("next_obs", obs_dim), ("rew", 1), ("term", 1)]}
    rng = np.random.default_rng(args.seed)
    checkpoints, start, ep_ret, ep_rets, first_step = [], time.time(), 0.0, [], 0
    # Resumable: every evaluation also writes the whole training state (networks, optimizers, replay buffer, RNGs)
    # beside the policy file, so a run stopped by a session limit continues from its last evaluation.
    state_path = policy_path(args, robot, domain).replace(".pt", ".train-state.pt")
    modules = dict(actor=actor, qf=qf, qf_target=qf_target, actor_opt=actor_opt, q_opt=q_opt, alpha_opt=alpha_opt)
    # A larger --policy-steps extends a run (the same run as one trained that long from the start, apart from the
    # fresh episode a resume begins with): the key leaves the step budget out, and the warm-up keeps its first length.
    run_key = {"env_id": args.env_id, "domain": domain, "seed": args.seed, "policy_eval_freq": args.policy_eval_freq}
    learning_starts = min(SAC_WARMUP_STEPS, n // 10)
    if os.path.exists(state_path):
        try:
            state = torch.load(state_path, weights_only=False)
        except Exception as e:
            raise DataGenError(f"training state {state_path} cannot be read ({one_line(e)}); delete it to start "
                               f"afresh") from None
        trained = state["run_key"].pop("policy_steps", None)  # older states hold their budget in the key
        if state["run_key"] != run_key:
            raise DataGenError(f"{state_path} belongs to another training run ({state['run_key']}); delete it to "
                               f"start afresh")
        learning_starts = state.get("learning_starts", min(SAC_WARMUP_STEPS, (trained or n) // 10))
        if state["step"] > n:
            raise DataGenError(f"--policy-steps {n}: {state_path} has already trained {state['step']} steps; give at "
                               f"least that many (a larger budget extends the run)")
        for name, module in modules.items():
            module.load_state_dict(state[name])
        with torch.no_grad():
            log_alpha.copy_(state["log_alpha"])
        first_step = state["step"]
        for k in buf:
            buf[k][:first_step] = state["buffer"][k]
        checkpoints, ep_rets = state["checkpoints"], state["ep_rets"]
        rng.bit_generator.state = state["numpy_rng"]
        torch.set_rng_state(state["torch_rng"])
        print(f"[{domain}] resuming SAC from step {first_step} ({state_path})", flush=True)
    obs, _ = env.reset(seed=args.seed + first_step)  # a resumed run starts a fresh episode
    # a sign of life after a few seconds, then every minute: the first evaluation comes only after policy_eval_freq steps
    next_report, learn_start = time.time() + 5, None
    for step in range(first_step, n):
        if step >= learning_starts and learn_start is None:
            learn_start = (step, time.time())  # the rate that predicts the rest: updates, not the fast warm-up
        if time.time() >= next_report:
            if learn_start is None or step == learn_start[0]:
                print(f"[{domain}] step {step:,}/{n:,}: random warm-up ({learning_starts:,} steps)", flush=True)
            else:
                sps = (step - learn_start[0]) / (time.time() - learn_start[1])
                print(f"[{domain}] step {step:,}/{n:,}  {sps:5.0f} steps/s  ETA {(n - step) / sps / 60:5.1f} min",
                      flush=True)
            next_report = time.time() + 60
        act = policy_act(None if step < learning_starts else actor, obs, env, rng, deterministic=False)
        next_obs, r, term, trunc, _ = env.step(act)
        for k, v in zip(buf, (obs, act, next_obs, r, term)):
            buf[k][step] = v
        obs, ep_ret = next_obs, ep_ret + float(r)
        if term or trunc:
            obs, _ = env.reset()
            ep_rets.append(ep_ret)
            ep_ret = 0.0
        if step >= learning_starts:
            idx = torch.from_numpy(rng.integers(0, step + 1, batch_size))
            s, a, s2, rew, d = (torch.from_numpy(buf[k])[idx] for k in buf)
            alpha = log_alpha.exp().detach()
            with torch.no_grad():
                a2, logp2 = actor(s2)
                q_next = torch.min(*qf_target(s2, a2)) - alpha * logp2
                y = rew.squeeze(-1) + gamma * (1 - d.squeeze(-1)) * q_next
            q1, q2 = qf(s, a)
            q_loss = F.mse_loss(q1, y) + F.mse_loss(q2, y)
            q_opt.zero_grad()
            q_loss.backward()
            q_opt.step()
            if step % 2 == 0:  # delayed actor and temperature (TD3-style): half the actor cost
                pi, logp = actor(s)
                for p in qf.parameters():
                    p.requires_grad_(False)
                actor_loss = (alpha * logp - torch.min(*qf(s, pi))).mean()
                for p in qf.parameters():
                    p.requires_grad_(True)
                actor_opt.zero_grad()
                actor_loss.backward()
                actor_opt.step()
                alpha_loss = -(log_alpha.exp() * (logp.detach() + target_entropy)).mean()
                alpha_opt.zero_grad()
                alpha_loss.backward()
                alpha_opt.step()
            with torch.no_grad():
                torch._foreach_lerp_(list(qf_target.parameters()), list(qf.parameters()), tau)
        if (step + 1) % args.policy_eval_freq == 0:
            rets = evaluate_policy(eval_env, actor, 5, seed=10_000 + step)
            checkpoints.append((step + 1, float(rets.mean()), {k: v.clone() for k, v in actor.state_dict().items()}))
            sps = (step + 1 - first_step) / (time.time() - start)
            print(f"[{domain}] step {step + 1}/{n}  eval return {rets.mean():8.1f}  train return "
                  f"{np.mean(ep_rets[-10:]) if ep_rets else 0:8.1f}  {sps:5.0f} steps/s  "
                  f"ETA {(n - step - 1) / sps / 60:5.1f} min", flush=True)
            state = {name: module.state_dict() for name, module in modules.items()}
            state.update(run_key=run_key, step=step + 1, learning_starts=learning_starts, log_alpha=log_alpha.detach().clone(),
                         buffer={k: v[:step + 1] for k, v in buf.items()}, checkpoints=checkpoints,
                         ep_rets=ep_rets, numpy_rng=rng.bit_generator.state, torch_rng=torch.get_rng_state())
            os.makedirs(os.path.dirname(state_path), exist_ok=True)
            torch.save(state, state_path + ".tmp")
            os.replace(state_path + ".tmp", state_path)
    if not checkpoints:
        raise DataGenError("--policy-steps must be at least --policy-eval-freq")
    # Expert: best checkpoint among the top 3 after a 10-episode re-evaluation. Medium: the 8 checkpoints whose
    # 5-episode return is closest to 40 % of the expert's are re-evaluated on 10 episodes; of those that earn a third
    # to a half of the expert's return, the steadiest (lowest std: a checkpoint that falls in some episodes and runs
    # in others is not a medium policy); if none does, the closest to 40 %. A finished run keeps its training state
    # beside the policy file: the same command selects again without training, a larger --policy-steps continues it.
    def reeval(sd):
        a = Actor(obs_dim, act_dim)
        a.load_state_dict(sd)
        return evaluate_policy(eval_env, a, 10, seed=20_000)
    top = sorted(checkpoints, key=lambda c: -c[1])[:3]
    expert_rets, expert = max(((reeval(c[2]), c) for c in top), key=lambda x: x[0].mean())
    best = expert_rets.mean()
    near = [(reeval(c[2]), c) for c in sorted(checkpoints, key=lambda c: abs(c[1] - 0.4 * best))[:8]]
    in_band = [x for x in near if best / 3 <= x[0].mean() <= best / 2]
    medium_rets, medium = (min(in_band, key=lambda x: x[0].std()) if in_band
                           else min(near, key=lambda x: abs(x[0].mean() - 0.4 * best)))
    record = {"env_id": args.env_id, "domain": domain, "sac_steps": n, "seed": args.seed,
              "expert": {"step": expert[0], "state_dict": expert[2], "return_mean": float(expert_rets.mean()),
                         "return_std": float(expert_rets.std())},
              "medium": {"step": medium[0], "state_dict": medium[2], "return_mean": float(medium_rets.mean()),
                         "return_std": float(medium_rets.std())},
              "curve": [(c[0], c[1]) for c in checkpoints], "obs_dim": obs_dim, "act_dim": act_dim}
    path = policy_path(args, robot, domain)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(record, path + ".tmp")
    os.replace(path + ".tmp", path)  # never a half-written policy file under its final name
    print(f"saved {path}: expert (step {expert[0]}) {expert_rets.mean():.1f} +- {expert_rets.std():.1f}, "
          f"medium (step {medium[0]}) {medium_rets.mean():.1f} +- {medium_rets.std():.1f}  "
          f"[{(time.time() - start) / 60:.1f} min]")
