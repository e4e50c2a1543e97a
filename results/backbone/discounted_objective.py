# What each learned policy achieves under the objective IQL optimises (the gamma-discounted return) and under the score
# (the undiscounted 1000-step return), beside the target data's own episodes. Run from the repository root:
#   python results/backbone/discounted_objective.py <run dir> [<run dir> ...] [--episodes 20] [--gammas 0.99 0.999]
# Each run dir holds args.json and stage5.pt (a v2a_iql.py run); the env and the target dataset (the first row) are
# those the first run's args.json names. Prints one row per run.
import argparse
import json
import pathlib
import sys

import gymnasium as gym
import minari
import numpy as np
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))
import v2a_utils as utils  # noqa: E402
from v2a_iql import mlp  # noqa: E402


def discounted(r: np.ndarray, gamma: float) -> float:
    return float(np.sum(r * gamma ** np.arange(len(r))))


def rollouts(policy, env, episodes: int, seed: int):
    """Per episode: its rewards (deterministic policy, seeds distinct from training's evaluations)."""
    out = []
    for ep in range(episodes):
        (obs, _), done, rewards = env.reset(seed=seed + ep), False, []
        while not done:
            with torch.no_grad():
                a = policy(torch.as_tensor(obs, dtype=torch.float32)).numpy()
            obs, r, term, trunc, _ = env.step(a * env.action_space.high)
            rewards.append(r)
            done = term or trunc
        out.append((np.array(rewards), bool(term)))
    return out


def row(name, episodes, gammas, ds):
    undisc = np.array([r.sum() for r, _ in episodes])
    score = minari.get_normalized_score(ds, undisc) * 100
    disc = [np.array([discounted(r, g) for r, _ in episodes]) for g in gammas]
    fell = np.mean([f for _, f in episodes]) * 100
    length = np.mean([len(r) for r, _ in episodes])
    return (f"| {name} | {len(episodes)} | {score.mean():.1f} | "
            + " | ".join(f"{d.mean():.0f} ± {d.std():.0f}" for d in disc) + f" | {fell:.0f} % | {length:.0f} |")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("runs", nargs="+")
    p.add_argument("--episodes", type=int, default=20)
    p.add_argument("--gammas", type=float, nargs="+", default=[0.99, 0.995, 0.999])
    p.add_argument("--seed", type=int, default=2_000_000, help="first evaluation seed (training uses others)")
    a = p.parse_args()
    torch.set_num_threads(1)
    first = json.loads((pathlib.Path(a.runs[0]) / "args.json").read_text())
    target_id = next(i for i, meta in first["datasets"].items() if meta["domain"] == "nominal")
    ds, env = minari.load_dataset(target_id), gym.make(first["env_id"])
    print("| policy | episodes | normalized score | "
          + " | ".join(f"discounted return, gamma {g}" for g in a.gammas) + " | fell | mean length |")
    print("|---" * (5 + len(a.gammas)) + "|")
    data = [(e.rewards, bool(e.terminations[-1])) for e in list(ds.iterate_episodes())[:-1]]
    print(row("the target data's episodes", data, a.gammas, ds))
    for run in a.runs:
        run = pathlib.Path(run)
        args = json.loads((run / "args.json").read_text())
        ckpt = torch.load(run / "stage5.pt", map_location="cpu", weights_only=False)
        da = env.action_space.shape[0]
        actor = mlp(env.observation_space.shape[0], 2 * da)
        actor.load_state_dict(ckpt["actor"])
        norm = utils.normalized_observation(args.get("stage5_data", {}))
        name = f"{args['exp_name']} s{args['seed']} ({ckpt['step']:,} steps)"
        print(row(name, rollouts(lambda o: torch.tanh(actor(norm(o))[..., :da]), env, a.episodes, a.seed), a.gammas, ds),
              flush=True)


if __name__ == "__main__":
    main()
