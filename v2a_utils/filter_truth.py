# What a filter gets right, measured against ground truth that only generated data have: the true dynamics gap of every
# source row (data_gen.py steps the nominal env from the row's own simulator state), its domain and its behaviour
# policy. A diagnostic of stages 1-4, computed once before stage 5 from the frozen scores (never on the hot path), and
# the oracle scores (--oracle) that put the truth in place of h and A. Definitions: docs/v2a_iql.md, "Filter accuracy".
from typing import Callable, Optional

import numpy as np
import torch

QUALITY_RANK = {"random": 0, "medium": 1, "expert": 2}  # the behaviour labels' order: the truth of value assignment
ORDERED_PAIRS = (("expert", "medium"), ("medium", "random"), ("expert", "random"))  # (higher, lower)
KEPT_BATCHES = 256  # fresh source batches on which the kept sets are measured (256 x 128 rows by default)


# ---- Ranks and the two rank statistics ------------------------------------------------------------------------------
def average_ranks(x: torch.Tensor) -> torch.Tensor:
    """1-based ranks of x (float64), ties sharing their average rank, as Spearman's and Mann-Whitney's statistics need."""
    x = x.double().cpu()
    order = torch.argsort(x, stable=True)
    _, inverse, counts = torch.unique_consecutive(x[order], return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).double()
    ranks = torch.empty_like(x)
    ranks[order] = (ends - (counts.double() - 1) / 2)[inverse]
    return ranks


def spearman(x: torch.Tensor, y: torch.Tensor) -> Optional[float]:
    """Spearman's rank correlation (Pearson's on average ranks); None where either side is constant (undefined)."""
    rx, ry = average_ranks(x), average_ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = float((rx.norm() * ry.norm()))
    return float((rx * ry).sum()) / denom if denom > 0 else None


def auc(higher: torch.Tensor, lower: torch.Tensor) -> Optional[float]:
    """P(a row of `higher` scores above a row of `lower`), ties counting one half (Mann-Whitney U / (n m)); 0.5 is chance,
    1 a perfect separation. None when either group is empty."""
    n, m = len(higher), len(lower)
    if n == 0 or m == 0:
        return None
    ranks = average_ranks(torch.cat([higher.cpu(), lower.cpu()]))
    return float((ranks[:n].sum() - n * (n + 1) / 2) / (n * m))


# ---- The truth per source row ---------------------------------------------------------------------------------------
def row_labels(d: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Domain index and behaviour-quality rank (QUALITY_RANK) of every source row, on the CPU."""
    tid = d["traj_id"].cpu()
    rank_of = torch.tensor([QUALITY_RANK[q] for q in d["qual_names"]])
    return d["dom"].cpu()[tid], rank_of[d["qual"].cpu()[tid]]


def gap_score(gap: torch.Tensor) -> torch.Tensor:
    """The dynamics oracle's h: 1 - 2 x (the row's percentile of the true gap among all source rows), in [-1, 1] like
    the contrastive cosine score; the rows closest to the target's dynamics score highest, tied gaps alike. Ranks, not
    the gap itself: the gap's scale differs by orders of magnitude between shifts, and the filter mixes h with A."""
    ranks = average_ranks(gap)
    return (1 - 2 * (ranks - 1) / max(len(gap) - 1, 1)).float().to(gap.device)


def quality_score(d: dict) -> torch.Tensor:
    """The full oracle's A: the behaviour label's rank (random 0, medium 1, expert 2) of every source row."""
    return row_labels(d)[1].float().to(d["data"].device)


# ---- The metrics --------------------------------------------------------------------------------------------------
def dynamics_metrics(h: torch.Tensor, gap: torch.Tensor, dom: torch.Tensor, dom_names: list) -> dict:
    """How well h ranks the rows by closeness to the target's dynamics: Spearman's correlation of h with minus the true
    gap, over all source rows and within each domain; each domain's mean h and mean gap; and the share of domain pairs
    that h's domain means order as the gap's do (1: h orders the domains by their true gap)."""
    h, gap = h.double().cpu(), gap.double().cpu()
    out = {"dyn_spearman": spearman(h, -gap)}
    means = {}
    for k, name in enumerate(dom_names):
        if (m := dom == k).any():
            out[f"dyn_spearman/{name}"] = spearman(h[m], -gap[m])
            means[name] = (float(h[m].mean()), float(gap[m].mean()))
            out[f"h_mean/{name}"], out[f"gap_mean/{name}"] = means[name]
    pairs = [(a, b) for i, a in enumerate(means) for b in list(means)[i + 1:] if means[a][1] != means[b][1]]
    agree = [(means[a][0] > means[b][0]) == (means[a][1] < means[b][1]) for a, b in pairs]
    out["dyn_domain_order"] = float(np.mean(agree)) if agree else None
    return out


def value_metrics(adv: torch.Tensor, dom: torch.Tensor, qual: torch.Tensor, dom_names: list) -> dict:
    """Value assignment: within each domain, the AUC of A for each pair of behaviour qualities present (expert over
    medium, medium over random, expert over random). Value misassignment: over every pair of rows of different quality,
    the share that A orders against the labels (the lower quality's A above the higher's, ties one half), separately
    for pairs from the same domain and from different domains. A pooled advantage that misassigns across domains has a
    cross-domain share well above its within-domain share."""
    adv = adv.double().cpu()
    out = {}
    group = {(k, int(q)): adv[(dom == k) & (qual == q)] for k in range(len(dom_names)) for q in qual.unique().tolist()}
    group = {g: v for g, v in group.items() if len(v)}
    for k, name in enumerate(dom_names):
        for hi, lo in ORDERED_PAIRS:
            if (k, QUALITY_RANK[hi]) in group and (k, QUALITY_RANK[lo]) in group:
                out[f"value_auc/{name}/{hi}_over_{lo}"] = auc(group[k, QUALITY_RANK[hi]], group[k, QUALITY_RANK[lo]])
    wrong = {"within": [0.0, 0.0], "cross": [0.0, 0.0]}  # misordered pairs, all pairs
    for (ka, qa), va in group.items():
        for (kb, qb), vb in group.items():
            if qa > qb:  # a holds the higher quality
                pairs = len(va) * len(vb)
                w = wrong["within" if ka == kb else "cross"]
                w[0] += (1 - auc(va, vb)) * pairs
                w[1] += pairs
    for where, (bad, total) in wrong.items():
        out[f"value_misassign_{where}"] = bad / total if total else None
    return out


def kept_metrics(keep_fn: Callable, idx: torch.Tensor, gap: Optional[torch.Tensor], dom: torch.Tensor,
                 qual: torch.Tensor, dom_names: list) -> dict:
    """What a filter keeps on the source batches idx [N, B]: keep_fn(idx) -> the kept positions [N, n_keep]. The mean
    true gap of the kept rows, the share of them whose dynamics equal the target's (gap 0), and their shares of each
    behaviour quality and each domain."""
    kept = idx.gather(1, keep_fn(idx)).reshape(-1).cpu()
    out = {}
    if gap is not None:
        g = gap.cpu()[kept].double()
        out.update(gap_mean=float(g.mean()), gap_zero_share=float((g == 0).double().mean()))
    for q, r in QUALITY_RANK.items():
        if (qual == r).any():
            out[f"quality_share/{q}"] = float((qual[kept] == r).double().mean())
    for k, name in enumerate(dom_names):
        out[f"domain_share/{name}"] = float((dom[kept] == k).double().mean())
    return out


def filter_accuracy(d: dict, h_src: torch.Tensor, adv_src: Optional[torch.Tensor], keep: Callable, batch_size: int,
                    seed: int) -> dict:
    """Every accuracy metric of one run's filter, flat (name -> number or None), for TensorBoard (filter/accuracy/...)
    and results.json. h_src, adv_src: the frozen scores of every source row (adv_src None without stage 3);
    keep(idx, h, adv, is_oracle) -> the kept positions [N, n_keep] in source batches idx [N, B], by the run's own filter
    (eq. 5.5) applied to the per-row scores h and adv (is_oracle: h is the oracle's, which no per-batch normalisation
    of the OT score applies to). The kept
    sets are measured on KEPT_BATCHES fresh batches drawn with their own generator (the run's training is unchanged),
    for the run's filter and, on the same batches, for the two oracles at the same xi: the dynamics oracle (h := the
    true gap's rank, gap_score) with the run's A, and the full oracle (A := the behaviour label's rank as well)."""
    gap = d.get("true_gap")
    dom, qual = row_labels(d)
    names = d["dom_names"]
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(d["n_src"], (KEPT_BATCHES, batch_size), generator=gen).to(h_src.device)
    zero_adv = torch.zeros_like(h_src)
    out = {}
    if gap is not None:
        out.update(dynamics_metrics(h_src, gap, dom, names))
    if adv_src is not None:
        out.update(value_metrics(adv_src, dom, qual, names))
    adv = adv_src if adv_src is not None else zero_adv
    sets = {"filter": lambda i: keep(i, h_src, adv, False)}
    if gap is not None:
        h_true, a_true = gap_score(gap), quality_score(d)
        sets["oracle_h"] = lambda i: keep(i, h_true, adv, True)
        sets["oracle_full"] = lambda i: keep(i, h_true, a_true, True)
    for name, fn in sets.items():
        out.update({f"kept/{name}/{k}": v for k, v in kept_metrics(fn, idx, gap, dom, qual, names).items()})
    return out


def summary_line(acc: dict) -> str:
    """The headline numbers of filter_accuracy, one line for the log."""
    parts = []
    for key, label in (("dyn_spearman", "Spearman(h, -gap)"), ("value_misassign_within", "A misordered within domains"),
                       ("value_misassign_cross", "across domains"), ("kept/filter/gap_mean", "kept mean gap"),
                       ("kept/oracle_h/gap_mean", "oracle's")):
        if acc.get(key) is not None:
            parts.append(f"{label} {acc[key]:.3f}")
    return "; ".join(parts) or "no ground truth in these datasets"


# ---- The report's section ---------------------------------------------------------------------------------------------
HEADLINE = (("dyn_spearman", "Spearman(h, −gap)"), ("dyn_domain_order", "domains ordered by mean gap"),
            ("value_misassign_within", "A misordered, same domain"), ("value_misassign_cross", "A misordered, across domains"),
            ("kept/filter/gap_mean", "kept: mean gap"), ("kept/oracle_h/gap_mean", "oracle h kept: mean gap"),
            ("kept/filter/gap_zero_share", "kept: gap 0"), ("kept/oracle_h/gap_zero_share", "oracle h kept: gap 0"))


def mean_ci(values: list, reps: int = 10_000, seed: int = 0) -> str:
    """'mean [lo, hi]': the mean over seeds with its 95 % percentile-bootstrap CI (one seed: the value alone)."""
    x = np.asarray([v for v in values if v is not None], dtype=float)
    if len(x) == 0:
        return "–"
    if len(x) == 1:
        return f"{x[0]:.3f}"
    boot = np.random.default_rng(seed).choice(x, (reps, len(x))).mean(1)
    return f"{x.mean():.3f} [{np.percentile(boot, 2.5):.3f}, {np.percentile(boot, 97.5):.3f}]"


def accuracy_lines(runs: list[dict], seed: int = 0) -> list[str]:
    """The page's tables of one task: runs are dicts with 'method', 'seed' and 'accuracy' (results.json
    filter_accuracy). The headline metrics per method, then every metric (rows) per method (columns); each cell the
    mean over seeds with its 95 % bootstrap CI."""
    methods = sorted({r["method"] for r in runs})
    by = {m: [r for r in runs if r["method"] == m] for m in methods}
    keys = sorted({k for r in runs for k in r["accuracy"]})
    L = ["| method | seeds | " + " | ".join(label for _, label in HEADLINE) + " |", "|---|---|" + "---|" * len(HEADLINE)]
    for m in methods:
        cells = [mean_ci([r["accuracy"].get(k) for r in by[m]], seed=seed) for k, _ in HEADLINE]
        L.append(f"| {m} | {sorted(r['seed'] for r in by[m])} | " + " | ".join(cells) + " |")
    L += ["", "Every metric (mean over seeds [95 % bootstrap CI]):", "",
          "| metric | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    for k in keys:
        L.append(f"| `{k}` | " + " | ".join(mean_ci([r["accuracy"].get(k) for r in by[m]], seed=seed) for m in methods) + " |")
    return L
