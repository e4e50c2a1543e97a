# Heterogeneous cross-domain offline datasets for V2A, stored with Minari.
# docs: docs/data_gen.md    method: ../shared/docs/method.md sections 3 and 14 (item 1-2)
"""Generate a heterogeneous source mixture (several dynamics-shifted domains, each collected by its own
behaviour policy) and a small target dataset in the nominal environment.

    python data_gen.py --env-id Hopper-v4                      # datasets, with the committed behaviour policies
    python data_gen.py --env-id Hopper-v4 --train-domain nominal   # train the behaviour policies of one domain
"""
import json
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass
from typing import Optional

import gymnasium as gym
import minari
import mujoco
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from minari.data_collector.episode_buffer import EpisodeBuffer


@dataclass
class Args:
    env_id: str = "Hopper-v4"
    """the nominal (target) environment: Hopper, Walker2d, HalfCheetah or Ant, version v4 or v5"""
    source: str = "torso-hard:random,gravity-0.5:expert,legjnt-hard:medium"
    """the source mixture: comma-separated `domain:quality[:weight]` entries (quality: random|medium|expert)"""
    source_size: int = 1_000_000
    """total transitions of the source mixture, split across entries by weight"""
    target_size: int = 100_000
    """transitions of the medium-quality target dataset (the paper's 10% regime; 5000 is the low-data regime)"""
    seed: int = 0
    """seed of the data collection (environments, action sampling)"""
    overwrite: bool = False
    """replace datasets that already exist under the same ids"""
    policy_dir: str = "policies"
    """where behaviour-policy actors are read from and written to"""
    ref_min_episodes: int = 100
    """episodes of the uniform random policy that measure `ref_min_score` in the target env"""
    ref_max_episodes: int = 20
    """episodes of the expert that measure `ref_max_score` in the target env"""
    # behaviour-policy training (only with --train-domain)
    train_domain: Optional[str] = None
    """train the medium and expert behaviour policies of this domain (e.g. `nominal`, `torso-hard`) instead of
    generating data"""
    policy_steps: int = 300_000
    """environment steps of the SAC run that trains a behaviour policy"""
    policy_eval_freq: int = 10_000
    """evaluate (and keep a checkpoint of) the SAC actor every this many steps"""
    threads: int = 1
    """torch CPU threads"""


# --------------------------------------------------------------------------------------------------------------
# Dynamics shifts (ODRL families: gravity, friction, kinematic = joint range, morphology = limb/torso geometry)
# --------------------------------------------------------------------------------------------------------------
SCALE_LEVELS = ("0.1", "0.5", "2.0", "5.0")  # gravity and friction multipliers, as in ODRL
JOINT_RANGE_SCALE = {"easy": 0.8, "medium": 0.5, "hard": 0.2}  # ODRL: Hopper leg [-150,0] -> [-120|-75|-30, 0]
LIMB_LENGTH_SCALE = {"easy": 0.8, "medium": 0.6, "hard": 0.4}  # ODRL: Hopper foot capsule x0.8 ... x0.4
TORSO_SCALE = {"easy": (1.2, 1.5), "medium": (1.6, 2.0), "hard": (2.0, 2.5)}  # (length, radius): torso 0.4->0.8, r 0.05->0.125
ROBOTS = {
    # robot: kinematic joint groups, morphology parts {part: (kind, geoms)}; kinds: torso (longer and thicker,
    # growing upwards), girth (thicker only), limb (shorter)
    "Hopper": dict(joints={"legjnt": ["leg_joint"], "footjnt": ["foot_joint"]},
                   parts={"torso": ("torso", ["torso_geom"]), "foot": ("limb", ["foot_geom"])}),
    "Walker2d": dict(joints={"thighjnt": ["thigh_joint", "thigh_left_joint"], "footjnt": ["foot_joint", "foot_left_joint"]},
                     parts={"torso": ("torso", ["torso_geom"]), "foot": ("limb", ["foot_geom", "foot_left_geom"])}),
    "HalfCheetah": dict(joints={"thighjnt": ["bthigh", "fthigh"], "footjnt": ["bfoot", "ffoot"]},
                        parts={"torso": ("girth", ["torso", "head"]), "foot": ("limb", ["bfoot", "ffoot"])}),
    "Ant": dict(joints={"hipjnt": [f"hip_{i}" for i in range(1, 5)], "anklejnt": [f"ankle_{i}" for i in range(1, 5)]},
                parts={"alllegs": ("limb", ["left_ankle_geom", "right_ankle_geom", "third_ankle_geom", "fourth_ankle_geom"]),
                       "halflegs": ("limb", ["left_ankle_geom", "right_ankle_geom"])}),
}
SUPPORTED_ENV_IDS = [f"{robot}-{v}" for robot in ROBOTS for v in ("v4", "v5")]
QUALITIES = ("random", "medium", "expert")


class DataGenError(Exception):
    """A problem with the user's input: printed as one line, without a traceback."""


def robot_of(env_id: str) -> str:
    robot, _, version = env_id.rpartition("-")
    if robot not in ROBOTS or version not in ("v4", "v5"):
        raise DataGenError(f"unknown env id {env_id!r}; supported: {', '.join(SUPPORTED_ENV_IDS)}")
    return robot


def domain_names(robot: str) -> list[str]:
    levels = list(JOINT_RANGE_SCALE)
    return (["nominal"] + [f"gravity-{l}" for l in SCALE_LEVELS] + [f"friction-{l}" for l in SCALE_LEVELS]
            + [f"{j}-{l}" for j in ROBOTS[robot]["joints"] for l in levels]
            + [f"{p}-{l}" for p in ROBOTS[robot]["parts"] for l in levels])


def check_domain(robot: str, domain: str) -> str:
    if domain not in domain_names(robot):
        raise DataGenError(f"unknown shift {domain!r} for {robot}; known: {', '.join(domain_names(robot))}")
    return domain


def target_env_kwargs(env_id: str) -> dict:
    # Ant-v5 appends 78 contact forces to the observation by default; drop them so that v4 and v5 match (27 dims).
    return {"include_cfrc_ext_in_observation": False} if env_id == "Ant-v5" else {}


def _scale_joint_range(lo: float, hi: float, s: float) -> tuple[float, float]:
    if lo <= 0.0 <= hi:  # shrink towards the zero posture, as ODRL does
        return lo * s, hi * s
    near, far = (lo, hi) if abs(lo) < abs(hi) else (hi, lo)  # Ant ankles ([30, 70] deg): keep the inner bound
    far = near + (far - near) * s
    return min(near, far), max(near, far)


def _scale_capsule(geom, length_scale: float, radius_scale: float, keep_bottom: bool):
    """Scale a capsule geom of an MjSpec. Limb capsules keep their centre; torso capsules keep their lower end, so
    the legs stay attached and the body grows upwards (ODRL's torso shift)."""
    if not np.isnan(geom.fromto[0]):  # fromto capsules (Ant legs, HalfCheetah torso): keep the attached end
        start, end = np.array(geom.fromto[:3]), np.array(geom.fromto[3:])
        geom.fromto = np.concatenate([start, start + (end - start) * length_scale])
    else:
        half = geom.size[1]
        geom.size[1] = half * length_scale
        if keep_bottom:
            geom.pos[2] = geom.pos[2] + half * (length_scale - 1.0)
    geom.size[0] = geom.size[0] * radius_scale


def build_shifted_model(xml_path: str, robot: str, domain: str) -> mujoco.MjModel:
    """Compile the robot's model with the dynamics shift `domain` applied."""
    family, _, level = domain.rpartition("-")
    spec = mujoco.MjSpec.from_file(xml_path)
    if family in ROBOTS[robot]["parts"]:
        kind, geoms = ROBOTS[robot]["parts"][family]
        for name in geoms:
            if kind == "torso":
                length_scale, radius_scale = TORSO_SCALE[level]
                _scale_capsule(spec.geom(name), length_scale, radius_scale, keep_bottom=True)
            elif kind == "girth":  # the legs hang from the ends of HalfCheetah's torso: change its radius only
                _scale_capsule(spec.geom(name), 1.0, TORSO_SCALE[level][1], keep_bottom=False)
            else:
                _scale_capsule(spec.geom(name), LIMB_LENGTH_SCALE[level], 1.0, keep_bottom=False)
    model = spec.compile()
    if family == "gravity":
        model.opt.gravity[:] = model.opt.gravity * float(level)
    elif family == "friction":
        model.geom_friction[:, 0] *= float(level)  # every geom, the floor included: contacts use the max of the pair
    elif family in ROBOTS[robot]["joints"]:
        for name in ROBOTS[robot]["joints"][family]:
            j = mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_JOINT, name)
            model.jnt_range[j] = _scale_joint_range(*model.jnt_range[j], JOINT_RANGE_SCALE[level])
    return model


_SHIFTED_CLASSES: dict = {}


def make_shifted_env(base_env_id: str, shift: str, **kwargs) -> gym.Env:
    """Gymnasium entry point (`data_gen:make_shifted_env`) of every shifted domain: the class of `base_env_id`
    with its model compiled by `build_shifted_model`. The kwargs live in the EnvSpec, so Minari's stored spec
    rebuilds exactly this domain."""
    robot = robot_of(base_env_id)
    check_domain(robot, shift)
    base_cls = gym.envs.registration.load_env_creator(gym.spec(base_env_id).entry_point)
    if base_cls not in _SHIFTED_CLASSES:
        class ShiftedEnv(base_cls):
            def __init__(self, shift: str, **kw):
                self._v2a_shift = shift  # read by _initialize_simulation inside the base __init__
                super().__init__(**kw)

            def _initialize_simulation(self):
                model = build_shifted_model(self.fullpath, robot_of(base_env_id), self._v2a_shift)
                model.vis.global_.offwidth = max(model.vis.global_.offwidth, self.width)
                model.vis.global_.offheight = max(model.vis.global_.offheight, self.height)
                return model, mujoco.MjData(model)

        ShiftedEnv.__name__ = f"Shifted{base_cls.__name__}"
        _SHIFTED_CLASSES[base_cls] = ShiftedEnv
    return _SHIFTED_CLASSES[base_cls](shift=shift, **{**target_env_kwargs(base_env_id), **kwargs})


for _env_id in SUPPORTED_ENV_IDS:  # guarded: the module is imported again as `data_gen` by the entry point
    _robot, _, _version = _env_id.rpartition("-")
    if f"V2A/Shifted{_robot}-{_version}" not in gym.registry:
        gym.register(f"V2A/Shifted{_robot}-{_version}", entry_point="data_gen:make_shifted_env",
                     max_episode_steps=1000, kwargs={"base_env_id": _env_id})


def make_domain_env(env_id: str, domain: str) -> gym.Env:
    """The nominal target env for `nominal`, otherwise the registered shifted env."""
    if domain == "nominal":
        return gym.make(env_id, **target_env_kwargs(env_id))
    robot, _, version = env_id.rpartition("-")
    return gym.make(f"V2A/Shifted{robot}-{version}", shift=domain)


# --------------------------------------------------------------------------------------------------------------
# Behaviour policies: SAC (Haarnoja et al. 2018) in one domain; checkpoints give the medium and expert actors
# --------------------------------------------------------------------------------------------------------------
LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0


class Actor(nn.Module):
    """Tanh-Gaussian SAC actor. Only this module is saved: a few hundred KB per policy."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: int = 256):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(obs_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        self.mean = nn.Linear(hidden, act_dim)
        self.log_std = nn.Linear(hidden, act_dim)

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


def policy_act(actor: Optional[Actor], obs: np.ndarray, env: gym.Env, rng: np.random.Generator,
               deterministic: bool) -> np.ndarray:
    """Action of a behaviour policy; `actor=None` is the uniform random policy."""
    if actor is None:
        return rng.uniform(env.action_space.low, env.action_space.high).astype(np.float32)
    with torch.no_grad():
        action, _ = actor(torch.as_tensor(obs, dtype=torch.float32)[None], deterministic=deterministic)
    return action[0].numpy()


def evaluate_policy(env: gym.Env, actor: Optional[Actor], episodes: int, seed: int) -> np.ndarray:
    """Undiscounted returns of deterministic (mean-action) episodes."""
    rng, returns = np.random.default_rng(seed), []
    for ep in range(episodes):
        obs, _ = env.reset(seed=seed + ep)
        done, ret = False, 0.0
        while not done:
            obs, r, term, trunc, _ = env.step(policy_act(actor, obs, env, rng, deterministic=True))
            ret, done = ret + float(r), term or trunc
        returns.append(ret)
    return np.array(returns)


def policy_path(args: Args, robot: str, domain: str) -> str:
    return os.path.join(args.policy_dir, robot.lower(), f"{domain}.pt")


def train_behaviour_policies(args: Args, robot: str, domain: str):
    """SAC in one domain; every `policy_eval_freq` steps the actor is evaluated and kept. The expert is the best
    checkpoint, the medium the checkpoint whose return is closest to 40% of the expert's (method.md section 14.1),
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
    gamma, tau, batch_size, learning_starts = 0.99, 0.005, 256, min(5000, args.policy_steps // 10)
    n = args.policy_steps
    buf = {k: np.zeros((n, d), np.float32) for k, d in
           [("obs", obs_dim), ("act", act_dim), ("next_obs", obs_dim), ("rew", 1), ("term", 1)]}
    rng = np.random.default_rng(args.seed)
    checkpoints, start, ep_ret, ep_rets, first_step = [], time.time(), 0.0, [], 0
    # Resumable: every evaluation also writes the whole training state (networks, optimizers, replay buffer, RNGs)
    # beside the policy file, so a run stopped by a session limit continues from its last evaluation.
    state_path = policy_path(args, robot, domain).replace(".pt", ".train-state.pt")
    modules = dict(actor=actor, qf=qf, qf_target=qf_target, actor_opt=actor_opt, q_opt=q_opt, alpha_opt=alpha_opt)
    run_key = {"env_id": args.env_id, "domain": domain, "policy_steps": n, "seed": args.seed,
               "policy_eval_freq": args.policy_eval_freq}
    if os.path.exists(state_path):
        state = torch.load(state_path, weights_only=False)
        if state["run_key"] != run_key:
            raise DataGenError(f"{state_path} belongs to another training run ({state['run_key']}); delete it to "
                               f"start afresh")
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
    for step in range(first_step, n):
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
            state.update(run_key=run_key, step=step + 1, log_alpha=log_alpha.detach().clone(),
                         buffer={k: v[:step + 1] for k, v in buf.items()}, checkpoints=checkpoints,
                         ep_rets=ep_rets, numpy_rng=rng.bit_generator.state, torch_rng=torch.get_rng_state())
            os.makedirs(os.path.dirname(state_path), exist_ok=True)
            torch.save(state, state_path + ".tmp")
            os.replace(state_path + ".tmp", state_path)
    if not checkpoints:
        raise DataGenError("--policy-steps must be at least --policy-eval-freq")
    # Expert: best checkpoint among the top 3 after a 10-episode re-evaluation; medium: closest to 40% of it.
    def reeval(sd):
        a = Actor(obs_dim, act_dim)
        a.load_state_dict(sd)
        return evaluate_policy(eval_env, a, 10, seed=20_000)
    top = sorted(checkpoints, key=lambda c: -c[1])[:3]
    scored = [(reeval(c[2]), c) for c in top]
    expert_rets, expert = max(scored, key=lambda x: x[0].mean())
    medium = min(checkpoints, key=lambda c: abs(c[1] - 0.4 * expert_rets.mean()))
    medium_rets = reeval(medium[2])
    record = {"env_id": args.env_id, "domain": domain, "sac_steps": n, "seed": args.seed,
              "expert": {"step": expert[0], "state_dict": expert[2], "return_mean": float(expert_rets.mean()),
                         "return_std": float(expert_rets.std())},
              "medium": {"step": medium[0], "state_dict": medium[2], "return_mean": float(medium_rets.mean()),
                         "return_std": float(medium_rets.std())},
              "curve": [(c[0], c[1]) for c in checkpoints], "obs_dim": obs_dim, "act_dim": act_dim}
    path = policy_path(args, robot, domain)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(record, path)
    if os.path.exists(state_path):
        os.remove(state_path)
    print(f"saved {path}: expert (step {expert[0]}) {expert_rets.mean():.1f} +- {expert_rets.std():.1f}, "
          f"medium (step {medium[0]}) {medium_rets.mean():.1f} +- {medium_rets.std():.1f}  "
          f"[{(time.time() - start) / 60:.1f} min]")



# --------------------------------------------------------------------------------------------------------------
# Mixture spec and dataset ids (the training scripts derive the same ids from the same flags)
# --------------------------------------------------------------------------------------------------------------
def parse_source(spec: str) -> list[tuple[str, str, float]]:
    """`domain:quality[:weight]` entries -> [(domain, quality, weight)]"""
    entries = []
    for item in filter(None, (x.strip() for x in spec.split(","))):
        parts = item.split(":")
        if len(parts) not in (2, 3) or parts[1] not in QUALITIES:
            raise DataGenError(f"malformed source entry {item!r}: expected domain:quality[:weight] with quality "
                               f"in {'|'.join(QUALITIES)}, e.g. 'gravity-0.5:random,torso-hard:medium'")
        try:
            weight = float(parts[2]) if len(parts) == 3 else 1.0
        except ValueError:
            weight = -1.0
        if not weight > 0:
            raise DataGenError(f"malformed source entry {item!r}: the weight must be a positive number")
        entries.append((parts[0], parts[1], weight))
    if not entries:
        raise DataGenError("empty source spec: give at least one domain:quality entry")
    return entries


def size_tag(n: int) -> str:
    return f"{n // 1000}k" if n >= 10_000 else str(n)  # a label: the exact count is in the dataset


def dataset_ids(env_id: str, source: str, source_size: int, target_size: int) -> tuple[list[str], str]:
    entries = parse_source(source)
    total = sum(w for _, _, w in entries)
    ns = f"v2a/{env_id.lower()}"
    src = [f"{ns}/source/{d.replace('.', 'p').replace('-', '')}-{q}-{size_tag(int(source_size * w / total))}-v0"
           for d, q, w in entries]
    return src, f"{ns}/target/medium-{size_tag(target_size)}-v0"


# --------------------------------------------------------------------------------------------------------------
# Collection and storage
# --------------------------------------------------------------------------------------------------------------
def load_actor(args: Args, robot: str, domain: str, quality: str) -> tuple[Optional[Actor], dict]:
    """The committed behaviour policy `quality` of `domain` (None for the uniform random policy)."""
    if quality == "random":
        return None, {}
    path = policy_path(args, robot, domain)
    if not os.path.exists(path):
        raise DataGenError(f"no behaviour policy {path}; train it with: python data_gen.py --env-id {args.env_id} "
                           f"--train-domain {domain}  (SAC, about 50 min on 2 CPU cores)")
    record = torch.load(path, weights_only=False)
    actor = Actor(record["obs_dim"], record["act_dim"])
    actor.load_state_dict(record[quality]["state_dict"])
    return actor, record[quality]


def collect(env: gym.Env, actor: Optional[Actor], n_transitions: int, seed: int, options: dict):
    """Whole episodes until `n_transitions`; the last episode is cut there (flagged as truncated), so no
    transition spans two episodes. Actions are sampled from the stochastic policy, as D4RL's were."""
    rng, buffers, count, ep, start, next_report = np.random.default_rng(seed), [], 0, 0, time.time(), 0.25
    while count < n_transitions:
        if count >= next_report * n_transitions:
            eta = (time.time() - start) * (n_transitions - count) / count
            print(f"      {count}/{n_transitions} transitions, ETA {eta:.0f} s", flush=True)
            next_report += 0.25
        obs, _ = env.reset(seed=seed + ep)
        o, a, r, te, tr = [obs], [], [], [], []
        while True:
            act = policy_act(actor, obs, env, rng, deterministic=False)
            obs, rew, term, trunc, _ = env.step(act)
            o.append(obs), a.append(act), r.append(rew), te.append(term)
            count += 1
            tr.append(trunc or (count == n_transitions and not term))
            if te[-1] or tr[-1]:
                break
        buffers.append(EpisodeBuffer(observations=np.array(o, np.float32), actions=np.array(a, np.float32),
                                     rewards=np.array(r, np.float64), terminations=np.array(te),
                                     truncations=np.array(tr), options=options))
        ep += 1
    return buffers


def dataset_exists(dataset_id: str) -> bool:
    return os.path.exists(os.path.join(minari.storage.get_dataset_path(), dataset_id))


def write_dataset(dataset_id: str, overwrite: bool, generation: dict, **create_kwargs):
    """Create the dataset in a staging root, then move it under its final id in one rename, so an interrupted
    run never leaves a half-written dataset under a final id."""
    root = str(minari.storage.get_dataset_path())
    staging = f"{root.rstrip(os.sep)}-staging-{os.getpid()}"
    os.environ["MINARI_DATASETS_PATH"], previous = staging, os.environ.get("MINARI_DATASETS_PATH")
    try:
        ds = minari.create_dataset_from_buffers(dataset_id=dataset_id, **create_kwargs)
        ds.storage.update_metadata({"v2a_generation": json.dumps(generation)})
    finally:
        if previous is None:
            del os.environ["MINARI_DATASETS_PATH"]
        else:
            os.environ["MINARI_DATASETS_PATH"] = previous
    final = os.path.join(root, dataset_id)
    if overwrite and os.path.exists(final):
        shutil.rmtree(final)
    os.makedirs(os.path.dirname(final), exist_ok=True)
    os.replace(os.path.join(staging, dataset_id), final)
    shutil.rmtree(staging, ignore_errors=True)


def episode_summary(ds) -> str:
    lengths = [m["total_steps"] for m in ds.storage.get_episode_metadata(range(ds.total_episodes))]
    returns = [float(ep.rewards.sum()) for ep in ds.iterate_episodes()]
    return (f"{ds.total_episodes:6d} episodes {ds.total_steps:8d} transitions  mean length {np.mean(lengths):6.1f}  "
            f"return {np.mean(returns):8.1f} +- {np.std(returns):7.1f}")


def generate(args: Args, robot: str):
    entries = parse_source(args.source)
    for domain, _, _ in entries:
        if domain == "nominal":
            raise DataGenError("the source mixture must contain shifted domains only (nominal is the target)")
        check_domain(robot, domain)
    if min(args.source_size, args.target_size) < 1:
        raise DataGenError("--source-size and --target-size must be positive")
    source_ids, target_id = dataset_ids(args.env_id, args.source, args.source_size, args.target_size)
    total_w = sum(w for _, _, w in entries)
    common = dict(algorithm_name="SAC behaviour policies (data_gen.py)", author="v2a",
                  code_permalink="data_gen.py", requirements=[f"mujoco=={mujoco.__version__}"])
    jobs = [(target_id, "nominal", "medium", args.target_size)] + [
        (i, d, q, int(args.source_size * w / total_w)) for i, (d, q, w) in zip(source_ids, entries)]
    def generation(domain, quality, n):  # what makes a dataset: re-running with the same values reuses it
        return {"env_id": args.env_id, "domain": domain, "quality": quality, "transitions": n, "seed": args.seed,
                "mixture": args.source if domain != "nominal" else None}

    for dataset_id, domain, quality, n in jobs:  # check everything before the first minute of collection
        if dataset_exists(dataset_id) and not args.overwrite:
            stored = minari.load_dataset(dataset_id).storage.metadata.get("v2a_generation")
            if stored is None or json.loads(stored) != generation(domain, quality, n):
                raise DataGenError(f"dataset {dataset_id} exists but was made with other arguments ({stored}); "
                                   f"pass --overwrite to replace it")
            continue
        load_actor(args, robot, domain, quality)
    if not dataset_exists(target_id) or args.overwrite:
        load_actor(args, robot, "nominal", "expert")
    start = time.time()
    for k, (dataset_id, domain, quality, n) in enumerate(jobs):
        if dataset_exists(dataset_id) and not args.overwrite:
            print(f"[{k + 1}/{len(jobs)}] reusing {dataset_id} (pass --overwrite to regenerate)")
            continue
        print(f"[{k + 1}/{len(jobs)}] collecting {dataset_id} ({domain}:{quality}, {n} transitions)", flush=True)
        env, t0 = make_domain_env(args.env_id, domain), time.time()
        actor, info = load_actor(args, robot, domain, quality)
        buffers = collect(env, actor, n, seed=args.seed + 1_000_000 * k, options={"domain": domain, "quality": quality})
        kwargs = dict(common, buffer=buffers, env=env, eval_env=env.spec)
        policy = f"the {quality} SAC policy of that domain" if actor is not None else "a uniform random policy"
        if domain == "nominal":
            eval_env = make_domain_env(args.env_id, "nominal")
            expert, _ = load_actor(args, robot, "nominal", "expert")
            ref_min = evaluate_policy(eval_env, None, args.ref_min_episodes, seed=args.seed + 123).mean()
            ref_max = evaluate_policy(eval_env, expert, args.ref_max_episodes, seed=args.seed + 456).mean()
            kwargs.update(ref_min_score=float(ref_min), ref_max_score=float(ref_max), description=(
                f"V2A target dataset: {n} transitions of {args.env_id} (the nominal dynamics) collected by {policy}. "
                f"ref_min_score: uniform random policy, {args.ref_min_episodes} episodes; ref_max_score: the nominal "
                f"expert, {args.ref_max_episodes} deterministic episodes. Seed {args.seed}."))
        else:
            kwargs["description"] = (
                f"V2A source component {domain}:{quality} ({n} transitions, {policy}) of the mixture "
                f"'{args.source}' for target {args.env_id}; shift '{domain}' applied by data_gen:make_shifted_env. "
                f"Episode metadata: options.domain, options.quality. Seed {args.seed}.")
        write_dataset(dataset_id, args.overwrite, generation(domain, quality, n), **kwargs)
        print(f"      written in {time.time() - t0:.0f} s; total {time.time() - start:.0f} s", flush=True)
    print(f"\nDatasets for {args.env_id} (MINARI_DATASETS_PATH={minari.storage.get_dataset_path()}):")
    for dataset_id, domain, quality, _ in jobs:
        ds = minari.load_dataset(dataset_id)
        print(f"  {dataset_id}\n      {domain:>16s}:{quality:<7s} {episode_summary(ds)}")
    target = minari.load_dataset(target_id)
    print(f"  target ref_min_score {target.storage.metadata['ref_min_score']:.1f}  "
          f"ref_max_score {target.storage.metadata['ref_max_score']:.1f}")


def main(args: Args):
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    robot = robot_of(args.env_id)
    if args.train_domain is not None:
        train_behaviour_policies(args, robot, check_domain(robot, args.train_domain))
        return
    generate(args, robot)


if __name__ == "__main__":
    try:
        main(tyro.cli(Args))
    except DataGenError as e:
        sys.exit(f"data_gen.py: error: {e}")
