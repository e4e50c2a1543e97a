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
import numpy as np
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))
from v2a_iql import mlp  # noqa: E402


def target_rows(args: dict, first: int = 0):
    """(states, actions) of the target dataset: every row, or the first `first` steps of each episode."""
    target = [k for k, v in args["datasets"].items() if v["domain"] == "nominal"][0]
    s, a = [], []
    for ep in minari.load_dataset(target).iterate_episodes():
        cut = first or len(ep.actions)
        s.append(ep.observations[:-1][:cut])
        a.append(ep.actions[:cut])
    return torch.tensor(np.concatenate(s), dtype=torch.float32), torch.tensor(np.concatenate(a), dtype=torch.float32)


print("| run | squared error, every target row | squared error, first 20 steps of each episode |")
print("|---|---|---|")
for run in sys.argv[1:]:
    args = json.load(open(pathlib.Path(run) / "args.json"))
    assert not args.get("normalize_states"), "this script feeds raw states"
    state = torch.load(pathlib.Path(run) / "stage5.pt", weights_only=False)["actor"]
    errors = []
    for first in (0, 20):
        s, a = target_rows(args, first)
        actor = mlp(s.shape[1], 2 * a.shape[1])
        actor.load_state_dict(state)
        with torch.no_grad():
            mean = torch.tanh(actor(s)[:, : a.shape[1]])
        errors.append(((mean - a) ** 2).sum(1).mean().item())
    print(f"| {args['exp_name']} s{args['seed']} ({args['variant']}) | {errors[0]:.3f} | {errors[1]:.3f} |")
