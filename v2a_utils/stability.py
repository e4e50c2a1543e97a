# Stage 5's critic under watch: what locates a divergence (gradient norms per network, the range of the filter's TD
# weight w, the critic's values per source domain against the bound that the data's rewards put on any return) and the
# documented fixes the backbones take as flags (a clipped TD target, clipped critic gradients). Nothing here changes a
# run whose fix flags are off. docs/v2a_iql.md, "Critic divergence".
from typing import Callable

import torch
from torch.utils.tensorboard import SummaryWriter

VALUE_ROWS = 4096  # fixed source rows (and as many target rows) on which the critic's values are logged


def grad_norm(grads: dict) -> torch.Tensor:
    """The global L2 norm of a dict of gradients (as torch.func.grad returns them), without a host sync."""
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(list(grads.values()))))


def clip_grads_(grads: dict, max_norm: float) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ on a dict of gradients, in place and graph-friendly (no host sync): scale them
    by min(1, max_norm / norm); max_norm 0 leaves them. Returns the norm before clipping, the logged one."""
    norm = grad_norm(grads)
    if max_norm > 0:
        torch._foreach_mul_(list(grads.values()), (max_norm / (norm + 1e-6)).clamp(max=1.0))
    return norm


def return_bounds(rewards: torch.Tensor, gamma: float) -> tuple[float, float]:
    """The range of any discounted return under rewards in [r_min, r_max] with termination: [min(0, r_min), max(0,
    r_max)] / (1 - gamma). A critic outside it has left what the data can support."""
    lo, hi = float(rewards.min()), float(rewards.max())
    scale = 1.0 / max(1.0 - gamma, 1e-6)
    return min(0.0, lo) * scale, max(0.0, hi) * scale


class ValueWatch:
    """The critic's min-of-ensemble Q on fixed rows (VALUE_ROWS drawn once from each source domain's rows and from the
    target rows, with their own generator: training's RNG is untouched), logged at every log step as
    charts/q_domain/<domain> (mean), charts/q_max_source and charts/q_min_source, beside the data's return bound
    (charts/return_bound_hi, _lo). A diverging critic leaves the bound on some domain's rows first."""

    def __init__(self, d: dict, rows: torch.Tensor, gamma: float, seed: int):
        gen = torch.Generator().manual_seed(seed)
        dom_row = d["dom"].cpu()[d["traj_id"].cpu()]
        self.rows, self.groups = rows, {}
        for k, name in enumerate(d["dom_names"]):
            ids = (dom_row == k).nonzero().squeeze(1)
            if len(ids):
                self.groups[name] = ids[torch.randperm(len(ids), generator=gen)[:VALUE_ROWS]].to(rows.device)
        n_tgt = d["n_tgt"]
        self.groups["target"] = (d["n_src"] + torch.randperm(n_tgt, generator=gen)[:VALUE_ROWS]).to(rows.device)
        self.bounds = return_bounds(rows[:, d["ds"] + d["da"]], gamma)

    @torch.no_grad()
    def log(self, q_values: Callable, writer: SummaryWriter, step: int):
        source = []
        for name, idx in self.groups.items():
            q = q_values(self.rows[idx])
            writer.add_scalar(f"charts/q_domain/{name}", q.mean().item(), step)
            if name != "target":
                source.append(q)
        if source:
            q = torch.cat(source)
            writer.add_scalar("charts/q_max_source", q.max().item(), step)
            writer.add_scalar("charts/q_min_source", q.min().item(), step)
        writer.add_scalar("charts/return_bound_lo", self.bounds[0], step)
        writer.add_scalar("charts/return_bound_hi", self.bounds[1], step)
