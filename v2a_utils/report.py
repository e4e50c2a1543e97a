# The results report of benchmark.py (docs/benchmark.md): `python benchmark.py report --sweep <name>` refreshes the
# exports in results/<name>/ (exports.export_run) and regenerates the sweep's page docs/results/<name>.md and its
# figures from them alone, then the index docs/results.md: tables judged by the verdict rule (verdict.py), learning
# curves and diagnostic figures. benchmark.py holds the command line (its Report flags are `cfg` here) and imports this
# module only for `report`; rliable and matplotlib are imported here only where they are used.
import csv
import glob
import itertools
import json
import os
import shlex
import zlib

import numpy as np

from v2a_utils import filter_truth
from v2a_utils.exports import NORM_FLAGS, export_run, load_runs
from v2a_utils.repository import ROOT
from v2a_utils.verdict import EXPERT, MIN_SEEDS, claim_lines, method_order, point, task_stats, variant_of

# Runners older than commit 4b8be74 (2026-11-26 14:54:51 UTC) read an attempt's code version when the attempt ended, so
# an attempt that started before it names the checkout at its end, not the code it started with
CODE_AT_START_SINCE = 1795704891
REPORT_SECTIONS = ("Reading", "Setup", "Filter accuracy")  # sections that are not score tables (the index lists those)


# ---- What a table is: its task (the script, the data, the backbone's inputs), and the levels it is read against -------
def backbone_label(task) -> str:
    """The backbone with how it scales states and rewards; runs that predate the flags used the release's raw inputs."""
    script, norm = task[0], dict(task[5])
    name = {"v2a_iql": "IQL", "v2a_td3bc": "TD3+BC"}.get(script, script)
    if not norm:
        return f"release {name}: raw states and rewards"
    states = "normalized states" if norm.get("normalize_states") else "raw states"
    scale = norm.get("reward_scale", "none")
    rewards = ("raw rewards" if scale in ("none", None) else
               "rewards × 1000 / episode-return range" if scale == "episode-range" else f"reward scale {scale}")
    actor = [f"AWR clip {norm['awr_clip']:g}"] if norm.get("awr_clip", 100.0) != 100.0 else []
    actor += [f"{norm['actor_schedule']} actor lr"] if norm.get("actor_schedule", "cosine") != "cosine" else []
    return f"{name}: {', '.join([states, rewards, *actor])}"


def task_label(task) -> str:
    script, env, tsize, source, ssize, _ = task
    return f"{env}, {backbone_label(task)}; target {tsize:,}" + (f"; source {source}" if source else "")


def task_slug(task) -> str:
    script, env, tsize, source, ssize, norm = task
    return (f"{env}_{script.replace('v2a_', '')}_t{tsize}" + (f"_{zlib.crc32(source.encode()) % 10**6}" if source else "")
            + (f"_n{zlib.crc32(repr(norm).encode()) % 10**4}" if norm else ""))


def anchors(truns: list[dict], st: dict) -> dict:
    """The levels a table is read against: the target data's own score (from the runs' results.json), BC's (the bc
    variant's level) and the expert's (100)."""
    levels = sorted({round(r["data_level"], 6) for r in truns if r.get("data_level") is not None})
    bc = [(m, s) for m, s in st["methods"].items() if variant_of(m) == "bc"]
    return dict(data=float(np.mean(levels)) if levels else None, bc=point(bc[0][1]) if bc else None,
                bc_n=bc[0][1]["n"] if bc else 0, expert=EXPERT)


def anchor_line(a: dict) -> str:
    data = (f"target data {a['data']:.1f}" if a["data"] is not None else
            "target data: not on record for these runs (their results.json predates it)")
    bc = (f"BC {a['bc']:.1f} ({'IQM' if a['bc_n'] >= MIN_SEEDS else 'mean'} of {a['bc_n']} seeds)" if a["bc"] is not None
          else "BC: no `bc` runs in this table")
    return f"Anchors: {data} · {bc} · expert {a['expert']:.0f}."


def score_protocol(truns: list[dict]) -> str:
    fin = [r for r in truns if r["finished"]]
    final = [r for r in fin if r["final"]]
    if final and len(final) == len(fin):
        eps = sorted({r["final"]["episodes"] for r in final})
        return (f"Score: the final evaluation of each run ({'/'.join(map(str, eps))} episodes at the end of stage 5, "
                "with seeds distinct from the periodic evaluations').")
    last = (f"the last periodic evaluation ({'/'.join(map(str, sorted({r['args'].get('eval_episodes') for r in fin})))} "
            "episodes)")
    if not final:
        return f"Score: {last}: these runs predate the final evaluation."
    return (f"Score: the final evaluation where a run has one ({len(final)} runs), else {last} ({len(fin) - len(final)} "
            "runs that predate it): **two protocols in one table**.")


def fmt(x: float, nd: int = 1) -> str:
    return "–" if x is None or not np.isfinite(x) else f"{x:.{nd}f}"


def stat_cells(st: dict, m: str) -> str:
    """The table cells of method m: IQM [95 % CI] | mean ± s.e. (range) | P(V2A > m) [CI] (naming the v2a method when
    the task has several); with fewer than MIN_SEEDS seeds, mean and range only."""
    s, several = st["methods"][m], len({a for a, b in st["poi"] if variant_of(a) == "v2a"}) > 1
    rng = f"range {fmt(s['lo'])}–{fmt(s['hi'])}"
    pois = [f"{p['p']:.2f} [{p['ci'][0]:.2f}, {p['ci'][1]:.2f}]" + (f" ({a})" if several else "")
            for (a, b), p in st["poi"].items() if b == m and variant_of(a) == "v2a"]
    if s["n"] < MIN_SEEDS:
        return f"– (n < {MIN_SEEDS}) | {fmt(s['mean'])} ({rng}) | –"
    return (f"{fmt(s['iqm'])} [{fmt(s['iqm_ci'][0])}, {fmt(s['iqm_ci'][1])}] | {fmt(s['mean'])} ± {fmt(s['se'])} ({rng}) | "
            f"{'; '.join(pois) or '–'}")


def poi_header(st: dict) -> str:
    return f"P(V2A > method) [{level_text(st).split(' (')[0]} CI]" if st["k"] else "P(V2A > method)"


def level_text(st: dict) -> str:
    return (f"{100 * st['level']:.2f}".rstrip("0").rstrip(".") + f" % (Bonferroni over the {st['k']} comparisons of this "
            "table)" if st["k"] else "–")


# ---- Figures --------------------------------------------------------------------------------------------------------
def mean_ci(values: np.ndarray, rs: np.random.RandomState, reps: int = 2000):
    """Mean over seeds and its 95 % percentile-bootstrap CI (columns: steps)."""
    boots = values[rs.randint(len(values), size=(reps, len(values)))].mean(1)
    return values.mean(0), np.percentile(boots, 2.5, axis=0), np.percentile(boots, 97.5, axis=0)


def on_common_steps(curves: list[dict]) -> tuple[list, np.ndarray]:
    """Curves ({step: value}, one per run) on the steps that all of them reached: (steps, values [runs, steps])."""
    steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
    return steps, np.array([[c[s] for s in steps] for c in curves])


def reference_lines(ax, a: dict, vertical: bool = False):
    """The anchors, each in its own line style: the target data's level (grey dashes), BC's (black dots), the expert's
    (100, black dash-dots)."""
    line = ax.axvline if vertical else ax.axhline
    for value, label, colour, style in ((a["data"], "target data", "0.45", "--"), (a["bc"], "BC", "k", ":"),
                                        (a["expert"], "expert", "k", "-.")):
        if value is not None:
            line(value, ls=style, lw=1.2, color=colour, label=f"{label} ({value:.1f})")


def pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_task_figures(task, truns: list[dict], st: dict, anc: dict, folder: str, seed: int) -> list[tuple[str, str]]:
    """The figures of a table: the score of every seed (strip plot), rliable's interval estimates (IQM, mean,
    optimality gap) and probabilities of improvement, and the learning curves (every seed thin, the mean over seeds
    with its CI), with the anchors as reference lines. Returns (file name, caption) per figure made."""
    from rliable import plot_utils
    plt, slug, made = pyplot(), task_slug(task), []
    fin = [r for r in truns if r["finished"]]
    methods = sorted({r["method"] for r in fin}, key=method_order)

    def save(fig, name: str, caption: str, tight: bool = False):
        fig.tight_layout()  # rliable's figures write their axis label outside the axes: tight bounding box for those
        fig.savefig(os.path.join(folder, f"{name}_{slug}.png"), dpi=110, bbox_inches="tight" if tight else None)
        plt.close(fig)
        made.append((f"{name}_{slug}.png", caption))

    if methods:
        fig, ax = plt.subplots(figsize=(1.2 * len(methods) + 3.5, 4))
        jitter = np.random.RandomState(seed)
        for i, m in enumerate(methods):
            s = st["methods"][m]
            ax.scatter(i + jitter.uniform(-0.12, 0.12, s["n"]), s["scores"], s=22, color=f"C{i}", zorder=3)
            ax.plot([i - 0.3, i + 0.3], [point(s)] * 2, color=f"C{i}", lw=2)
        reference_lines(ax, anc)
        ax.set_xticks(range(len(methods)), [f"{m}\n(n={st['methods'][m]['n']})" for m in methods], fontsize=8)
        ax.set(ylabel="normalized score (the table's score)", xlabel="method", title=task_label(task).split(";")[0])
        ax.legend(fontsize=7, loc="best")
        save(fig, "scores", "The score of every finished seed (dots) and each method's level (bar: the IQM with "
             f"{MIN_SEEDS} seeds or more, else the mean), against the anchors (dashed).")
    ci_methods = [m for m in methods if "agg" in st["methods"][m]]
    if ci_methods:
        pts = {m: np.array(st["methods"][m]["agg"]) for m in ci_methods}
        cis = {m: np.array(st["methods"][m]["agg_ci"]) for m in ci_methods}
        fig, _ = plot_utils.plot_interval_estimates(pts, cis, metric_names=["IQM", "Mean", "Optimality gap"],
                                                    algorithms=ci_methods, xlabel="normalized score",
                                                    subfigure_width=3.4, row_height=0.5)
        made_note = ", ".join(m for m in methods if m not in ci_methods)
        save(fig, "intervals", f"IQM, mean and optimality gap (the mean shortfall below the expert's {EXPERT:.0f}) "
             "with their 95 % stratified-bootstrap CIs (rliable), for the methods with "
             f"{MIN_SEEDS} finished seeds or more" + (f" (not {made_note})." if made_note else "."), tight=True)
    if st["poi"]:
        probs = {f"{a},{b}": np.array(p["p"]) for (a, b), p in st["poi"].items()}
        cis = {f"{a},{b}": np.array(p["ci"]) for (a, b), p in st["poi"].items()}
        fig, ax = plt.subplots(figsize=(4.5, 0.45 * len(probs) + 1.2))
        plot_utils.plot_probability_of_improvement(probs, cis, ax=ax, xlabel="P(X > Y)")
        ax.axvline(0.5, ls="--", lw=1, color="k")
        save(fig, "poi", f"P(X > Y), the probability that a run of X scores above a run of Y, with its "
             f"{level_text(st)} stratified-bootstrap CI; a claim X > Y holds when the whole interval lies right of 0.5 "
             "(dashed).", tight=True)
    rs = np.random.RandomState(seed)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    drew = False
    for i, m in enumerate(methods):
        steps, v = on_common_steps([dict(r["curves"].get("eval/normalized_score", [])) for r in fin if r["method"] == m])
        if not steps:
            continue
        for row in v:
            ax.plot(steps, row, color=f"C{i}", lw=0.6, alpha=0.35)
        mu, lo, hi = mean_ci(v, rs)
        ax.plot(steps, mu, color=f"C{i}", lw=2, label=f"{m} (n={len(v)})")
        ax.fill_between(steps, lo, hi, color=f"C{i}", alpha=0.15)
        drew = True
    if drew:
        reference_lines(ax, anc)
        ax.set(xlabel="stage-5 gradient steps", ylabel="normalized score (periodic evaluations)",
               title=task_label(task).split(";")[0])
        ax.legend(fontsize=7, ncol=2)
        save(fig, "curves", "The periodic evaluations over stage 5: every seed (thin) and the mean over seeds (thick) "
             "with its 95 % percentile-bootstrap CI (shaded), on the steps that every finished run of a method reached; "
             "the anchors dashed.")
    else:
        plt.close(fig)
    return made


def central_range(hists: list, lo: float = 0.01, hi: float = 0.99) -> tuple[float, float]:
    """The lo and hi quantiles of pooled histograms given as (right bucket edge, count) pairs."""
    edges, counts = np.array(sorted(p for h in hists for p in h)).T
    cdf = np.cumsum(counts) / counts.sum()
    a, b = edges[np.searchsorted(cdf, lo, side="right")], edges[min(np.searchsorted(cdf, hi), len(edges) - 1)]
    pad = 0.05 * (b - a) or 1.0
    return float(a - pad), float(b + pad)


def stage1_caption(runs: list[dict]) -> str:
    """What the stage-1 curves show, read off them: the loss's level early and late, its spikes (a point well above
    its neighbours' median), and the domain probe at the last check."""
    parts, spikes, late = [], [], []
    firsts, lasts = [], []
    for r in runs:
        pts = r["curves"].get("repr/rec_loss", [])
        if len(pts) < 12:
            continue
        v = np.array([p[1] for p in pts])
        tenth = max(1, len(v) // 10)
        firsts.append(np.median(v[:tenth]))
        lasts.append(np.median(v[-tenth:]))
        ratio = [v[i] / np.median(np.delete(v[max(0, i - 5): i + 6], min(i, 5))) for i in range(len(v))]
        spikes.append(max(ratio))
        if ratio[-1] > 1.5:
            late.append(f"{r['method']} s{r['seed']}")
    span = lambda v, f: f"{min(v):{f}}" if f"{min(v):{f}}" == f"{max(v):{f}}" else f"{min(v):{f}}–{max(v):{f}}"  # noqa: E731
    if firsts:
        parts.append(f"the reconstruction loss (log scale) goes from {span(firsts, '.3g')} over the first tenth of the "
                     f"logged iterations to {span(lasts, '.3g')} over the last tenth (per-seed medians); the largest spike "
                     f"of a seed is {span(spikes, '.1f')}× the median of its neighbours ({sum(s >= 2 for s in spikes)} of "
                     f"{len(spikes)} seeds reach 2×)")
        if late:
            parts.append(f"at the last logged iteration the loss is still on a spike in {', '.join(late)}")
    tag = "repr/stage1_domain_probe_acc"
    probe = [r["curves"][tag][-1][1] for r in runs if r["curves"].get(tag)]
    if probe:
        parts.append(f"the held-out domain probe on z reads {span(probe, '.2f')} at the last check")
    return ("Stage 1 over its iterations, every seed: " + "; ".join(parts) + "." if parts else
            "Stage 1 over its iterations, every seed: the TC-ELBO reconstruction loss and the held-out domain probe on z.")


def plot_diagnostics(task, runs: list[dict], folder: str) -> list[tuple[str, str]]:
    """The z embedding (v2a), the advantage per domain x quality (v2a, dvdf), stage 1's curves (every run with a
    stage 1), the kept fractions (filtered variants), the critics' values and the actor's weight on source rows
    (VALUE_TAGS, the runs that log them); from the lowest seed of each variant for the first two, every seed for the
    third, the mean over seeds for the last two. Returns (file name, caption) per figure made."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made, slug = [], task_slug(task)

    def save(fig, name: str, caption: str):
        fig.tight_layout()
        fig.savefig(os.path.join(folder, f"{name}_{slug}.png"), dpi=110)
        plt.close(fig)
        made.append((f"{name}_{slug}.png", caption))

    first = {}
    for r in sorted(runs, key=lambda r: r["seed"]):
        first.setdefault(r["method"], r)
    def read_z(r: dict):
        with open(os.path.join(r["dir"], "z_pca.csv")) as fh:
            head, *rows = list(csv.reader(fh))
        return np.array([[float(a), float(b)] for a, b, *_ in rows]), rows, [float(h.split("=")[1]) for h in head[4:6]]

    v2a = [r for m, r in first.items() if m.split(" ")[0] == "v2a" and os.path.exists(os.path.join(r["dir"], "z_pca.csv"))]
    sample = "a balanced subsample of up to 1,000 trajectories per domain"
    if v2a:
        r = v2a[0]
        xy, rows, var = read_z(r)
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
        for ax, col, what in zip(axes, (2, 3), ("domain", "quality")):
            for lab in sorted({row[col] for row in rows}):
                sel = np.array([row[col] == lab for row in rows])
                ax.scatter(xy[sel, 0], xy[sel, 1], s=4, alpha=0.6, label=lab)
            ax.set(title=f"z of source trajectories by {what} ({r['method']}, seed {r['seed']})",
                   xlabel=f"PC1 ({100 * var[0]:.0f} % of the variance)", ylabel=f"PC2 ({100 * var[1]:.0f} %)")
            ax.legend(fontsize=8, markerscale=3)
        save(fig, "z", "The modality latent z (the posterior mean of each source trajectory, stage 2's "
             f"relabelling, {sample}; first two principal components), coloured by domain and by behaviour quality "
             "(as in the paper's Fig. 2).")
    z_method = v2a[0]["method"] if v2a else None
    seeds = [q for q in sorted(runs, key=lambda q: q["seed"])
             if q["method"] == z_method and os.path.exists(os.path.join(q["dir"], "z_pca.csv"))]
    if len(seeds) > 1:  # the same picture for every seed: does the structure hold beyond the first?
        zs = [read_z(q) for q in seeds]
        cols = min(5, len(seeds))
        nrows = -(-len(seeds) // cols)
        fig, axes = plt.subplots(nrows, cols, figsize=(3.4 * cols, 3.2 * nrows), squeeze=False)
        groups = sorted({(row[2], row[3]) for _, rows, _ in zs for row in rows})
        for ax, q, (xy, rows, var) in zip(axes.flat, seeds, zs):
            for k, group in enumerate(groups):
                sel = np.array([(row[2], row[3]) == group for row in rows])
                ax.scatter(xy[sel, 0], xy[sel, 1], s=3, alpha=0.6, color=f"C{k}", label=" ".join(group))
            ax.set(title=f"seed {q['seed']}", xlabel=f"PC1 ({100 * var[0]:.0f} %)", ylabel=f"PC2 ({100 * var[1]:.0f} %)")
        for ax in axes.flat[len(seeds):]:
            ax.axis("off")
        axes.flat[0].legend(fontsize=7, markerscale=3)
        save(fig, "zseeds", f"z as above for each of the {len(seeds)} seeds of {seeds[0]['method']} ({sample}), coloured by "
             "domain × quality; each seed's own principal components, so axes and signs differ between panels.")
    adv = [r for m, r in first.items()
           if m.split(" ")[0] in ("v2a", "dvdf") and os.path.exists(os.path.join(r["dir"], "adv_hist.csv"))]
    if adv:
        fig, axes = plt.subplots(1, len(adv), figsize=(5.5 * len(adv), 4), squeeze=False)
        for ax, r in zip(axes[0], sorted(adv, key=lambda r: method_order(r["method"]))):
            groups: dict = {}
            with open(os.path.join(r["dir"], "adv_hist.csv")) as fh:
                for row in csv.DictReader(fh):
                    groups.setdefault(row["group"], []).append((float(row["right_edge"]), float(row["count"])))
            # TensorBoard's buckets grow exponentially away from 0 (some are 1e-12 wide): re-bin them uniformly over the
            # central range (each bucket's count spread over its span), or a few far outliers squeeze the bodies to a line
            lo, hi = central_range(list(groups.values()))
            bins = np.linspace(lo, hi, 61)
            for g, pts in sorted(groups.items()):
                edges, counts = np.array(pts).T
                cdf = np.interp(bins, edges, np.cumsum(counts) / counts.sum())
                ax.step(bins[1:], np.diff(cdf) / np.diff(bins), where="pre", label=g)
            ax.set_xlim(lo, hi)
            ax.set(title=f"advantage A per domain-quality ({r['method']}, seed {r['seed']})",
                   xlabel="A (1st-99th percentile of all groups shown)", ylabel="density")
            ax.legend(fontsize=7)
        save(fig, "adv", "The advantage A of the source rows per domain-quality group, as the stage-5 "
             "filter sees it: V2A's A(s, a, z) against DVDF's z-free A(s, a) (as in the paper's Fig. 2).")
    stage1 = [r for r in sorted(runs, key=lambda r: (method_order(r["method"]), r["seed"]))
              if "repr/stage1_domain_probe_acc" in r["curves"]]
    if stage1:  # has stage 1 trained long enough? (the --repr-steps budget)
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for r in stage1:
            for ax, tag in zip(axes, ("repr/rec_loss", "repr/stage1_domain_probe_acc")):
                if r["curves"].get(tag):
                    ax.plot(*zip(*r["curves"][tag]), label=f"{r['method']} s{r['seed']}", alpha=0.8)
        axes[0].set(title="stage 1: TC-ELBO reconstruction loss", xlabel="TC-ELBO iterations", ylabel="L_rec", yscale="log")
        axes[1].set(title="stage 1: held-out domain probe on z", xlabel="TC-ELBO iterations", ylabel="accuracy",
                    ylim=(0, 1.02))
        for ax in axes:
            ax.legend(fontsize=7)
        save(fig, "stage1", stage1_caption(stage1))
    kept = sorted({r["method"] for r in runs if any(t.startswith("filter/kept_frac/") for t in r["curves"])}, key=method_order)
    if kept:
        fig, axes = plt.subplots(len(kept), 2, figsize=(11, 3.2 * len(kept)), squeeze=False)
        for row_axes, m in zip(axes, kept):
            rr = [r for r in runs if r["method"] == m]
            tags = sorted({t for r in rr for t in r["curves"] if t.startswith("filter/kept_frac/")})
            for tag in tags:
                name = tag.rsplit("/", 1)[1]
                ax = row_axes[1] if name in ("random", "medium", "expert") else row_axes[0]
                steps, v = on_common_steps([dict(r["curves"][tag]) for r in rr if tag in r["curves"]])
                if steps:
                    ax.plot(steps, v.mean(0), label=name)
            for ax, what in zip(row_axes, ("domain", "quality")):
                ax.set(title=f"{m}: kept fraction per {what} (mean of {len(rr)} seeds)", xlabel="stage-5 steps",
                       ylabel="kept fraction", ylim=(0, 1))
                ax.legend(fontsize=8)
        save(fig, "kept", "The stage-5 filter over training: the fraction of each domain's and each "
             "behaviour quality's source rows that it keeps, mean over seeds.")
    value_tags = [t for t in VALUE_TAGS if any(t in r["curves"] for r in runs)]
    if value_tags:  # do the critics drift on the source rows, and how much of the actor's regression do they carry?
        fig, axes = plt.subplots(1, len(value_tags), figsize=(5.5 * len(value_tags), 4), squeeze=False)
        methods = sorted({r["method"] for r in runs}, key=method_order)  # one colour per method in every panel
        for ax, tag in zip(axes[0], value_tags):
            drawn = []
            for colour, m in enumerate(methods):
                steps, v = on_common_steps([dict(r["curves"][tag]) for r in runs if r["method"] == m and tag in r["curves"]])
                if steps:
                    ax.plot(steps, v.mean(0), label=f"{m} ({len(v)} seed{'s' * (len(v) > 1)})", color=f"C{colour}")
                    drawn.append((m, v.mean(0)))
            ax.set(title=VALUE_TAGS[tag], xlabel="stage-5 steps")
            if tag.startswith("charts/q_"):  # values, not the share (whose first steps are far from the rest)
                clip_to_central(ax, drawn)
            ax.legend(fontsize=7)
        logs_share = "charts/awr_weight_source_share" in value_tags
        share = ", and the source rows' share of the actor's advantage weight" * logs_share
        save(fig, "values", f"The critics' values on the target and the source rows of each batch{share}, "
             "mean over seeds.")
    return made


def clip_to_central(ax, curves: list[tuple[str, np.ndarray]], lo: float = 5.0, hi: float = 95.0):
    """One diverging run's mean can reach thousands where the others sit near 250 and flatten every other curve: the
    axis then spans the central lo-hi percentiles of all points drawn (padded by a fifth), and the title names each
    curve that leaves it with its extreme."""
    if not curves:
        return
    points = np.concatenate([v for _, v in curves])
    a, b = np.percentile(points, [lo, hi])
    pad = 0.2 * max(b - a, 1e-6)
    a, b = a - pad, b + pad
    out = [f"{m} reaches {v.min() if v.min() < a else v.max():,.0f}" for m, v in curves if v.min() < a or v.max() > b]
    if out:
        ax.set_ylim(a, b)
        ax.set_title(ax.get_title() + "\naxis clipped: " + "; ".join(out), fontsize=8)


# the stage-5 diagnostics of the values figure (runs from before they were logged have none): tag -> panel title
VALUE_TAGS = {"charts/q_target_rows": "min Q on the batch's target rows (mean of seeds)",
              "charts/q_source_rows": "min Q on the batch's source rows (mean of seeds)",
              "charts/awr_weight_source_share": "IQL: source rows' share of the actor's weight"}


# ---- The page -------------------------------------------------------------------------------------------------------
def say(msg: str):
    print(f"[report] {msg}", flush=True)


def doc_link(page: str) -> str:
    """docs/benchmark.md's verdict rule, linked from a page."""
    return os.path.relpath(os.path.join(ROOT, "docs", "benchmark.md"), os.path.dirname(os.path.abspath(page))) + \
        "#the-verdict-rule"


def rule_lines(cfg, page: str) -> list[str]:
    return [f"**The verdict rule** ([docs/benchmark.md]({doc_link(page)}), fixed before the runs, applied to every table "
            "below the same way). *Score:* the final evaluation of each finished run (its `--final-eval-episodes` "
            "episodes, 50 by default, on seeds of its own: each table says how many); runs that predate it are scored by "
            "their last periodic evaluation, and their table says so. Normalized score: 100 · (return − ref_min) / "
            "(ref_max − ref_min) with reference returns measured in our own target envs (not comparable with D4RL). "
            "*Statistics* (rliable): IQM (interquartile mean) with its 95 % stratified-bootstrap percentile CI "
            f"({cfg.reps} replications); P(X > Y), the probability that a run of X scores above a run of Y (Mann-Whitney), "
            f"with a stratified-bootstrap CI ({cfg.poi_reps} replications) at 1 − 0.05 / k, k the pairwise comparisons "
            "the table reports (Bonferroni: a family-wise error of 5 % for the table). *A claim X > Y holds* when that CI "
            "lies above 0.5, is *reversed* when it lies below, and is *not resolved* otherwise; the IQMs are descriptive. "
            "*The ranking* V2A > DVDF > IGDF > merged holds when each of its three steps holds. *Check:* each claim also "
            "gives the two-sided Mann-Whitney U test of P = 0.5 (exact for fewer than 8 seeds a method, without ties), "
            "Holm-adjusted over the same family; where it disagrees with the CI, the line says so (with 5 seeds the "
            f"percentile bootstrap is the more liberal of the two). *Seeds:* a method with fewer than {MIN_SEEDS} finished "
            "seeds gets its mean and range (min–max) only, no IQM, CI or verdict.", ""]


def report(cfg) -> dict:
    """The sweep's page, its figures and the index, from the flags of `python benchmark.py report` (`cfg`); returns the
    statistics of each table."""
    sweep = os.path.basename(cfg.sweep.rstrip("/"))
    runs_dir, res_dir = os.path.join(cfg.runs_root, sweep), os.path.join(cfg.results_root, sweep)
    if cfg.export and os.path.isdir(runs_dir):
        say(f"exporting {runs_dir}/ to {res_dir}/")
        for d in sorted(glob.glob(os.path.join(runs_dir, "*", ""))):
            export_run(d, os.path.join(res_dir, os.path.basename(d.rstrip("/"))))
    say(f"reading runs from {res_dir}/")
    runs = load_runs(res_dir)
    say(f"{len(runs)} runs: {sum(r['finished'] for r in runs)} finished, {sum(not r['finished'] for r in runs)} "
        "unfinished (counted, not scored)")
    page, figures = os.path.join(cfg.pages, f"{sweep}.md"), os.path.join(cfg.pages, sweep)
    os.makedirs(figures, exist_ok=True)
    tasks: dict = {}
    for r in runs:  # --filter-only runs train no policy: their accuracy has its own section, they have no score
        if not r["filter_only"]:
            tasks.setdefault(r["task"], []).append(r)
    fig_rel = os.path.relpath(figures, os.path.dirname(os.path.abspath(page)))
    L = [f"# Results: sweep `{sweep}`", "",
         f"Generated by `python benchmark.py report --sweep {sweep}` from the exported runs in `{res_dir}/` "
         "(args.json, results.json, curves.csv of every run); do not edit by hand, regenerate.", ""]
    warnings_at_top = len(L)
    L += rule_lines(cfg, page)
    stats_all, made, top = {}, [], []
    if not runs:
        L += [f"**No runs exported yet** under `{res_dir}/`. Start the sweep (docs/benchmark.md), then regenerate.", ""]
    for task, truns in sorted(tasks.items(), key=lambda kv: str(kv[0])):
        say(f"{task_label(task)}: bootstrap ({cfg.reps} replications for the IQMs, {cfg.poi_reps} for each P(X > Y))")
        st = stats_all[task] = task_stats(truns, cfg.reps, cfg.poi_reps, cfg.seed)
        anc = anchors(truns, st)
        present = {r["method"] for r in truns}
        L += [f"## {task_label(task)}", "", score_protocol(truns), "", anchor_line(anc), "",
              f"| method | seeds finished | unfinished | IQM [95 % CI] | mean ± s.e. (range) | {poi_header(st)} | seeds |",
              "|---|---|---|---|---|---|---|"]
        for m in sorted(present, key=method_order):
            unf = sum(1 for r in truns if r["method"] == m and not r["finished"])
            seeds = sorted(r["seed"] for r in truns if r["method"] == m and r["finished"])
            cells = stat_cells(st, m) if m in st["methods"] else "– | – | –"
            L.append(f"| {m} | {len(seeds)} | {unf} | {cells} | {seeds or '–'} |")
        if lines := claim_lines(st, present):
            L += ["", "Claims (the verdict rule" + (f"; CIs of P at {level_text(st)}" if st["k"] else "") + "):", "", *lines]
        if anc["bc"] is not None:
            learners = {m: point(s) for m, s in st["methods"].items() if variant_of(m) != "bc"}
            if learners and max(learners.values()) < anc["bc"]:
                best = max(learners, key=learners.get)
                top.append(f"**{task_label(task)}: no learner's level reaches behaviour cloning's** (BC {anc['bc']:.1f}; "
                           f"the best, `{best}`, {learners[best]:.1f}; levels are IQMs, or means below 5 seeds: "
                           "descriptive, not a claim).")
        k = min([cfg.tail_evals] + [len(r["evals"]) for r in truns if r["finished"]])  # a small sweep's runs: fewer
        say(f"{task_label(task)}: evaluation-noise check (the mean of the last {k} periodic evaluations)")
        st["tail"] = task_stats(truns, cfg.reps, cfg.poi_reps, cfg.seed, lambda r: float(np.mean(r["evals"][-k:])))
        L += ["", *tail_lines(k, truns, st["tail"]), ""]
        fin = [r for r in truns if r["finished"]]  # the figures show the table's runs
        figs = plot_task_figures(task, truns, st, anc, figures, cfg.seed) + plot_diagnostics(task, fin, figures)
        for f, caption in figs:
            say(f"figure {os.path.join(figures, f)}")
            L += [f"![{f}]({fig_rel}/{f})", "", f"*{caption}*", ""]
        made += [f for f, _ in figs]
    L += accuracy_section(runs, cfg.seed)
    L[warnings_at_top:warnings_at_top] = [*top, ""] if top else []
    reading = os.path.join(res_dir, "reading.md")  # written by hand, kept with the exported runs: regenerating keeps it
    L += ["## Reading", ""]
    if os.path.exists(reading):
        with open(reading) as fh:
            L += [f"(From `{reading}`, written by hand for the runs above.)", "", fh.read().strip(), ""]
    else:
        L += ["> **TODO (lead): interpretation.** What the numbers do and do not show: which claims hold by the verdict "
              "rule (above), the gains against the paper's +13.7 % (DVDF) and +21.4 % (IGDF), and where the ranking does "
              "not appear, what the diagnostics (z separation, advantage distributions, kept fractions) say about why. "
              f"Write it to `{reading}`; the report includes it.", ""]
    L += setup_lines(runs)
    for stale in sorted(set(os.listdir(figures)) - set(made)):  # this sweep's folder: nothing else writes there
        if stale.endswith(".png"):
            say(f"removing {os.path.join(figures, stale)} (no longer made)")
            os.remove(os.path.join(figures, stale))
    with open(page, "w") as fh:
        fh.write("\n".join(L))
    say(f"wrote {page} and {len(made)} figures in {figures}/ ({len(runs)} runs, {len(tasks)} tables)")
    if cfg.index:
        write_index(cfg.pages, cfg.index)
        say(f"wrote {cfg.index} (the index of the pages in {cfg.pages}/)")
    return stats_all


def accuracy_section(runs: list[dict], seed: int) -> list[str]:
    """The filter's accuracy against the truth of the generated data (filter_truth.py), per task: every run that
    recorded it, --filter-only runs and trained ones alike."""
    acc_tasks: dict = {}
    for r in runs:
        if r["accuracy"]:
            acc_tasks.setdefault(r["task"], []).append(r)
    if not acc_tasks:
        return []
    L = ["## Filter accuracy", "", "Each filter against the truth of the generated data, computed once after stage 4 "
         "(definitions: docs/v2a_iql.md, \"Filter accuracy\"): h against each source row's true dynamics gap, A against "
         "its behaviour label, and the rows the filter keeps beside those the oracles keep at the same xi.", ""]
    for task, truns in sorted(acc_tasks.items(), key=lambda kv: str(kv[0])):
        say(f"{task_label(task)}: filter accuracy of {len(truns)} runs")
        L += [f"### {task_label(task)}", "", *filter_truth.accuracy_lines(truns, seed), ""]
    return L


def write_index(pages: str, index: str):
    """The index of the results pages: one line per page that `report` made in `pages`, with its tables."""
    rows = []
    for path in sorted(glob.glob(os.path.join(pages, "*.md"))):
        with open(path) as fh:
            lines = fh.read().splitlines()
        if not lines or not lines[0].startswith("# Results: sweep `"):
            continue
        tables = [x[3:] for x in lines if x.startswith("## ") and x[3:] not in REPORT_SECTIONS]
        notes = [x for x in lines[:12] if x.startswith("**") and "no learner reaches" in x]
        rel = os.path.relpath(path, os.path.dirname(os.path.abspath(index)))
        accuracy_only = not tables and "## Filter accuracy" in lines  # a sweep of --filter-only runs: no scores
        head = f"- **[{lines[0].split('`')[1]}]({rel})**" + (
            "" if tables else ": filter accuracy only (--filter-only runs, no scores)" if accuracy_only else ": no runs yet")
        rows += [head + "".join(f" {n}" for n in notes), *[f"  - {t}" for t in tables]]
    L = ["# Results", "", "One page per sweep, each generated by `python benchmark.py report --sweep <name>` from the "
         "exported runs in `results/<name>/`, with its figures in a folder of the same name; this index is regenerated "
         "with every report, from the pages that exist. How the runs are scored and when a claim holds: "
         f"[the verdict rule]({doc_link(index)}).", "", *rows, ""]
    os.makedirs(os.path.dirname(os.path.abspath(index)), exist_ok=True)
    with open(index, "w") as fh:
        fh.write("\n".join(L))


def tail_lines(k: int, truns: list[dict], tail: dict) -> list[str]:
    """The check of evaluation noise: `tail`, the statistics of each run's mean over its last k periodic evaluations, as
    a table with the spread of those evaluations within a run, and its claims by the same rule."""
    L = [f"**Evaluation noise.** The same statistics and rule with each run scored by the mean of its last {k} periodic "
         "evaluations (a check, not the score); sd within a run: the standard deviation of those "
         f"{k} evaluations, mean over the seeds.", "",
         f"| method | mean of last {k}: IQM [95 % CI] | mean ± s.e. (range) | {poi_header(tail)} | sd within a run |",
         "|---|---|---|---|---|"]
    for m in tail["methods"]:
        sds = [float(np.std(r["evals"][-k:], ddof=1)) for r in truns if r["method"] == m and r["finished"]
               and len(r["evals"]) > 1]
        L.append(f"| {m} | {stat_cells(tail, m)} | {fmt(float(np.mean(sds))) if sds else '–'} |")
    if lines := claim_lines(tail, {r["method"] for r in truns}):
        level = f" (CIs of P at {level_text(tail)})" if tail["k"] else ""
        L += ["", f"Claims by the mean of the last {k} periodic evaluations{level}:", "", *lines]
    return L


def elide_paths(command: str) -> str:
    """A launching command without the machine's paths: --runs-root and --results-root given as absolute paths are
    dropped (the defaults, relative to the repository, hold the same runs), any other absolute path keeps its name."""
    words, out, skip = shlex.split(command), [], False
    for i, w in enumerate(words):
        if skip:
            skip = False
            continue
        flag, _, value = w.partition("=")
        if flag in ("--runs-root", "--results-root", "--runs_root", "--results_root"):
            if value and os.path.isabs(value):
                continue
            if not value and i + 1 < len(words) and os.path.isabs(words[i + 1]):
                skip = True
                continue
        out.append(f"{flag}=<path>/{os.path.basename(value)}" if value and os.path.isabs(value) else
                   f"<path>/{os.path.basename(w)}" if os.path.isabs(w) else w)
    return " ".join(map(shlex.quote, out)).replace("'<path>/", "<path>/")


def concurrency(attempts: list[dict]) -> int:
    """The most attempts running at the same time on one machine."""
    events = sorted((t, d) for a in attempts if a.get("end") for t, d in ((a["start"], 1), (a["end"], -1)))
    return max(itertools.accumulate(d for _, d in events), default=0)


def dataset_lines(runs: list[dict]) -> list[str]:
    """The datasets the runs trained on, by the content fingerprint each run recorded (args.json "datasets"), with the
    machine that made them and the runs that used them: generation is not bit-portable across CPUs, so a number is
    tied to the arrays it came from (docs/data_gen.md)."""
    seen: dict = {}
    for r in runs:
        for ds_id, rec in (r["args"].get("datasets") or {}).items():
            cpu = ((rec or {}).get("machine") or {}).get("cpu") or "machine not recorded"
            key = (ds_id, (rec or {}).get("fingerprint") or "not recorded", cpu)
            seen.setdefault(key, []).append(r)
    if not seen:
        return []
    L = ["Datasets (the fingerprint of their arrays that each run recorded; \"not recorded\": made or used before "
         "datasets carried one; the runs that used each):", "",
         "| dataset | fingerprint | made on | runs |", "|---|---|---|---|"]
    for (ds_id, fp, cpu), rr in sorted(seen.items()):
        L.append(f"| `{ds_id}` | `{fp}` | {cpu} | {len(rr)} |")
    return L + [""]


def setup_lines(runs: list[dict]) -> list[str]:
    """Commands, budgets and backbones, machines, code and wall time, from the exported records."""
    L = ["## Setup", "", "Commands (as launched, the machine's paths elided; re-launching one continues its sweep):", "",
         "```bash"]
    L += sorted({elide_paths(r["rec"].get("spec", {}).get("launch", "?")) for r in runs}) or ["# none yet"]
    L += ["```", ""]
    budget_keys = ("repr_steps", "sql_steps", "info_steps", "total_steps", "eval_freq", "eval_episodes")
    budgets: dict = {}
    for r in runs:
        b = {k: r["args"].get(k) for k in budget_keys}
        b.update({k: r["args"][k] for k in NORM_FLAGS if k in r["args"]})  # where they differ between tables: shown
        budgets.setdefault(json.dumps(b), set()).add(backbone_label(r["task"]))
    L += ["Budgets and input scaling (normalisation flags absent: runs that predate them):", ""]
    L += [f"- {', '.join(sorted(names))}: `{b}`" for b, names in sorted(budgets.items())] or ["- –"]
    L += [""]
    attempts = [a for r in runs for a in r["rec"].get("attempts", [])]
    hosts: dict = {}
    for a in attempts:
        hosts.setdefault((a["machine"]["host"], a["machine"]["cpu"], a["machine"]["cores"]), []).append(a)
    machines = [f"{h} ({cpu}, {cores} cores; up to {concurrency(aa)} of this sweep's runs at a time)"
                for (h, cpu, cores), aa in sorted(hosts.items())]
    L += ["Machines: " + ("; ".join(machines) or "–") + ". One CPU thread per run (OMP_NUM_THREADS=1).", ""]
    L += dataset_lines(runs)
    codes: dict = {}
    for r in runs:
        for a in r["rec"].get("attempts", []):
            at_end = a["start"] < CODE_AT_START_SINCE
            who = (backbone_label(r["task"]).split(":")[0].removeprefix("release "), method_order(r["method"]), r["seed"])
            codes.setdefault(a.get("code") or "not recorded", set()).add((*who, " †" * at_end))
    L += ["Code (the git commit of the training scripts recorded with each attempt; the runs that used it; \"+modified\": "
          "tracked code differed from that commit, or, for attempts recorded before 3b11831, any tracked file, such as "
          "the exports a running sweep rewrites):", ""]
    L += [f"- `{c[:7] if c != 'not recorded' else c}{'+modified' * c.endswith('+modified')}`: "
          f"{', '.join(f'{b} {m} s{seed}{mark}' for b, (_, m), seed, mark in sorted(names))}"
          for c, names in sorted(codes.items())]
    if any(n[3] for names in codes.values() for n in names):
        L += ["", "† Recorded when the attempt ended, not when it started: runners before commit 4b8be74 (2026-11-26 "
              "14:54 UTC) read the checkout's commit at an attempt's end, and these attempts started before it, so the "
              "commit named may postdate the code they ran (e.g. an attempt from 13:20 to 16:02 UTC names 4b8be74). The "
              "code each of them started with is not on record."]
    L += [""]
    if runs:
        L += ["| method | table | seeds (finished) | wall time per finished run, h: mean [min, max] | process-hours |",
              "|---|---|---|---|---|"]
        groups: dict = {}
        for r in runs:
            groups.setdefault((r["method"], task_label(r["task"])), []).append(r)
        total = 0.0
        for (m, t), rr in sorted(groups.items(), key=lambda kv: (kv[0][1], method_order(kv[0][0]))):
            w = [r["rec"].get("wall_s") or 0 for r in rr if r["finished"]]
            allw = sum(r["rec"].get("wall_s") or 0 for r in rr) / 3600
            total += allw
            span = f"{np.mean(w) / 3600:.2f} [{min(w) / 3600:.2f}, {max(w) / 3600:.2f}]" if w else "–"
            L.append(f"| {m} | {t} | {sorted(r['seed'] for r in rr if r['finished'])} | {span} | {allw:.1f} |")
        shared = "; ".join(f"{cores}-core {h} shared by up to {concurrency(aa)} runs"
                           for (h, _, cores), aa in sorted(hosts.items()))
        L += ["", f"Process-hours (one thread each, {shared}): the wall-clock hours of the runs' processes, summed over "
              f"all attempts, finished or not: {total:.1f}. Not core-hours of a dedicated machine.", ""]
    return L
