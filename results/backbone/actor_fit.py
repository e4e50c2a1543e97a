# How closely each run's last actor fits the target data's actions: the squared error of tanh(mean) against the data's
# action, summed over the action's dimensions and averaged over (a) every target row and (b) the first 20 steps of each
# target episode. Run from the repository root:
#   python results/backbone/actor_fit.py <run dir> [<run dir> ...]
# Each run dir holds args.json and stage5.pt of a v2a_iql.py run on raw states; the target dataset is the one its
# args.json names.
import json
import pathlib
import sys

import minari
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))
from v2a_iql import mlp  # noqa: E402


def target_episodes(args: dict):
    """(states, actions) of each episode of the target dataset that the run's args.json names."""
    target = next(k for k, v in args["datasets"].items() if v["domain"] == "nominal")
    return [(torch.tensor(ep.observations[:-1], dtype=torch.float32), torch.tensor(ep.actions, dtype=torch.float32))
            for ep in minari.load_dataset(target).iterate_episodes()]


def squared_error(actor, episodes, first: int = 0) -> float:
    """Mean over rows of the summed squared error of tanh(mean): every row, or the first `first` of each episode."""
    cut = slice(first or None)
    s, a = torch.cat([s[cut] for s, _ in episodes]), torch.cat([a[cut] for _, a in episodes])
    with torch.no_grad():
        mean = torch.tanh(actor(s)[:, : a.shape[1]])
    return ((mean - a) ** 2).sum(1).mean().item()


print("| run | squared error, every target row | squared error, first 20 steps of each episode |")
print("|---|---|---|")
for run in sys.argv[1:]:
    args = json.load(open(pathlib.Path(run) / "args.json"))
    assert not args.get("normalize_states"), "this script feeds raw states"
    episodes = target_episodes(args)
    ds, da = episodes[0][0].shape[1], episodes[0][1].shape[1]
    actor = mlp(ds, 2 * da)
    actor.load_state_dict(torch.load(pathlib.Path(run) / "stage5.pt", weights_only=False)["actor"])
    print(f"| {args['exp_name']} s{args['seed']} ({args['variant']}) | {squared_error(actor, episodes):.3f} | "
          f"{squared_error(actor, episodes, 20):.3f} |")
