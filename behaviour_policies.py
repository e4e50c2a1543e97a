# SAC (Haarnoja et al. 2018) behaviour policies of one dynamics-shifted domain: `python data_gen.py --env-id
# Hopper-v4 --train-domain gravity-0.5` runs train_behaviour_policies. Its checkpoints give the medium and expert actors
# that data_gen.py collects with (policies/<robot>/<domain>.pt). docs: docs/data_gen.md ("Behaviour policies")
import os
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from data_gen import SAC_WARMUP_STEPS, Args, DataGenError, evaluate_policy, make_domain_env, one_line, policy_act, policy_path

LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0


class Actor(nn.Module):
    """Tanh-Gaussian SAC actor. Only this module is saved: a few hundred KB per policy. It lives here, with the
    trainer, so that data_gen.py imports torch only where policies run (data_gen.Actor still finds it)."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: int = 256):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(obs_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        self.mean = nn.Linear(hidden, act_dim)
        self.log_std = nn.Linear(hidden, act_dim)
        # act()'s tensors, looked up once: nn.Module's attribute look-ups cost it a fifth of its time. The same objects
        # as the layers' (load_state_dict and the optimizer write into them in place), so they never go stale
        self._act_params = (self.net[0].weight, self.net[0].bias, self.net[2].weight, self.net[2].bias, self.mean.weight,
                            self.mean.bias, self.log_std.weight, self.log_std.bias)

    def forward(self, obs: torch.Tensor, deterministic: bool = False):
        h = self.net(obs)
        mean = self.mean(h)
        if deterministic:
            return torch.tanh(mean), None
        log_std = torch.tanh(self.log_std(h))
        log_std = LOG_STD_MIN + 0.5 * (LOG_STD_MAX - LOG_STD_MIN) * (log_std + 1)  # CleanRL's soft clamp
        std = log_std.exp()
        pre_tanh = mean + std * torch.randn_like(mean)
        action = torch.tanh(pre_tanh)
        log_prob = (-0.5 * ((pre_tanh - mean) / std) ** 2 - log_std - 0.5 * np.log(2 * np.pi)).sum(-1)
        log_prob = log_prob - torch.log(1 - action.pow(2) + 1e-6).sum(-1)
        return action, log_prob

    def act(self, obs: np.ndarray, deterministic: bool) -> np.ndarray:
        """forward()'s action for one observation, bit for bit (the same kernels, the same noise drawn), in about half
        the time: no log-probability and no nn.Module calls. Acting is a third of a collection step, and this pays
        for most of the true dynamics gap that data_gen.py measures beside it."""
        (w1, b1, w2, b2, w_mean, b_mean, w_std, b_std), x = self._act_params, torch.as_tensor(obs, dtype=torch.float32)[None]
        h = torch.relu(F.linear(torch.relu(F.linear(x, w1, b1)), w2, b2))
        mean = F.linear(h, w_mean, b_mean)
        if deterministic:
            return torch.tanh(mean)[0].numpy()
        log_std = torch.tanh(F.linear(h, w_std, b_std))
        log_std = LOG_STD_MIN + 0.5 * (LOG_STD_MAX - LOG_STD_MIN) * (log_std + 1)  # as forward() computes it
        return torch.tanh(mean + log_std.exp() * torch.randn_like(mean))[0].numpy()


class TwinQ(nn.Module):
    def __init__(self, obs_dim: int, act_dim: int, hidden: int = 256):
        super().__init__()
        def mlp():
            return nn.Sequential(nn.Linear(obs_dim + act_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, 1))
        self.q1, self.q2 = mlp(), mlp()

    def forward(self, obs, act):
        x = torch.cat([obs, act], -1)
        return self.q1(x).squeeze(-1), self.q2(x).squeeze(-1)



def train_behaviour_policies(args: Args, robot: str, domain: str):
    """SAC in one domain; every `policy_eval_freq` steps the actor is evaluated and kept. The expert is the best
    checkpoint, the medium the checkpoint whose return is closest to 40% of the expert's (our choice of "medium"),
    both re-evaluated on 10 fresh episodes before they are saved."""
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
