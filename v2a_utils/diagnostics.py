# Diagnostics of the method at work (the paper's Fig. 2), logged once per run: how well z separates the source domains
# (stages 1 and 2), and the OT dynamics score per domain (stage 4). They read the scores; nothing here changes them.
import numpy as np
import torch
from torch.utils.tensorboard import SummaryWriter


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
