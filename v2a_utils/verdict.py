# The verdict rule of the benchmark's tables (docs/benchmark.md#the-verdict-rule), fixed before the runs and applied to
# every table the same way: per method the level of its finished seeds (rliable's IQM, mean and optimality gap with
# stratified-bootstrap CIs), per compared pair the probability of improvement with a Bonferroni-level CI and the
# Mann-Whitney check, and the claims of the paper's ranking that these decide. rliable and scipy are imported where
# the statistics are computed: benchmark.py imports this module for VARIANTS.
import warnings
from typing import Callable

import numpy as np

VARIANTS = ["v2a", "dvdf", "igdf", "merged", "target"]  # a comparison's variants in the tables' order (a sweep's default)
RANKING = ["v2a", "dvdf", "igdf", "merged"]  # the paper's claim, best first
BASELINE = "target"  # target data only: V2A must beat it for the source data to have helped at all
PAPER_GAIN = {"dvdf": 13.7, "igdf": 21.4}  # the paper's relative improvement of V2A over these baselines, %
MIN_SEEDS = 5  # fewer finished seeds: mean and range only (a bootstrap over 3 runs is little more than the runs themselves)
ALPHA = 0.05  # family-wise error rate of a table's pairwise comparisons (Bonferroni: each CI at 1 - ALPHA / k)
EXPERT = 100.0  # the normalized score of the target env's expert (ref_max): the optimality gap's threshold


def method_order(m: str) -> tuple:
    v = m.split(" ")[0]
    order = VARIANTS + ["bc"]
    return (order.index(v) if v in order else len(order), m)


def variant_of(m: str) -> str:
    return m.split(" ")[0]


def compared_pairs(methods: list[str]) -> list[tuple[str, str]]:
    """The pairwise comparisons a table reports, the family of its Bonferroni correction: P(V2A > X) for every v2a method
    and every other method, and the paper's ranking steps that do not involve V2A (dvdf > igdf, igdf > merged)."""
    pairs = [(a, b) for a in methods if variant_of(a) == "v2a" for b in methods if variant_of(b) != "v2a"]
    for suffix in sorted({m.partition(" ")[2] for m in methods}):
        names = [" ".join(filter(None, [v, suffix])) for v in RANKING]
        pairs += [(a, b) for a, b in zip(names[1:], names[2:]) if a in methods and b in methods]
    return pairs


def claims(present: set) -> list[tuple[str, str]]:
    """The claims a table tests, for the methods it has runs of: each step of V2A > DVDF > IGDF > merged, V2A > target
    only and V2A > BC (per group of grid flags)."""
    out = []
    for suffix in sorted({m.partition(" ")[2] for m in present}):
        names = [" ".join(filter(None, [v, suffix])) for v in RANKING]
        out += [(a, b) for a, b in zip(names, names[1:]) if a in present and b in present]
        out += [(names[0], b) for b in (" ".join(filter(None, [x, suffix])) for x in (BASELINE, "bc"))
                if names[0] in present and b in present]
    return out


def task_stats(runs: list[dict], reps: int, poi_reps: int, seed: int, score: Callable = lambda r: r["score"]) -> dict:
    """Per method: n, mean, standard error, range and, with MIN_SEEDS finished seeds or more, IQM, mean and optimality
    gap with 95 % stratified-bootstrap CIs (rliable) of `score` over the finished runs; per compared pair with MIN_SEEDS
    seeds each: the probability of improvement with its CI at 1 - ALPHA / k (k: the pairs compared)."""
    from rliable import library, metrics
    from scipy import stats
    warnings.filterwarnings("ignore", category=FutureWarning, module="arch")  # rliable 1.2 passes arch's random_state

    scores = {}
    for r in runs:
        if r["finished"]:
            scores.setdefault(r["method"], []).append(score(r))
    out = {"methods": {}, "poi": {}}
    rs = np.random.RandomState(seed)
    aggregates = lambda v: np.array([metrics.aggregate_iqm(v), metrics.aggregate_mean(v),  # noqa: E731
                                     metrics.aggregate_optimality_gap(v, EXPERT)])
    for m, s in sorted(scores.items(), key=lambda kv: method_order(kv[0])):
        x = np.asarray(s, float)
        out["methods"][m] = dict(n=len(x), mean=float(x.mean()), se=float(x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1
                                 else float("nan"), lo=float(x.min()), hi=float(x.max()), scores=x.tolist())
        if len(x) >= MIN_SEEDS:
            np.random.seed(rs.randint(2**31))  # rliable's stratified resampling draws from NumPy's global RNG too
            pt, ci = library.get_interval_estimates({m: x[:, None]}, aggregates, reps=reps, random_state=rs)
            out["methods"][m].update(iqm=float(pt[m][0]), iqm_ci=[float(ci[m][0][0]), float(ci[m][1][0])],
                                     agg=pt[m].tolist(), agg_ci=ci[m].tolist())
    testable = [(a, b) for a, b in compared_pairs(list(out["methods"]))
                if min(out["methods"][a]["n"], out["methods"][b]["n"]) >= MIN_SEEDS]
    out["k"], out["level"] = len(testable), 1 - ALPHA / max(1, len(testable))
    for a, b in testable:
        x, y = (np.asarray(scores[k], float)[:, None] for k in (a, b))
        # rliable's independent-samples bootstrap (two score arrays) ignores random_state and draws its indices from
        # NumPy's global RNG: seed that from rs, or these CIs change from one regeneration to the next
        np.random.seed(rs.randint(2**31))
        p, ci = library.get_interval_estimates({"p": (x, y)}, metrics.probability_of_improvement, reps=poi_reps,
                                               confidence_interval_size=out["level"], random_state=rs)
        # the check on the bootstrap, which is liberal with few seeds: the Mann-Whitney U test of the same P = 0.5
        u = stats.mannwhitneyu(x[:, 0], y[:, 0], alternative="two-sided", method="auto")
        out["poi"][(a, b)] = dict(p=float(np.squeeze(p["p"])), ci=[float(np.squeeze(ci["p"][0])),
                                                                  float(np.squeeze(ci["p"][1]))], u_p=float(u.pvalue))
    ordered, running = sorted(out["poi"].values(), key=lambda v: v["u_p"]), 0.0
    for i, v in enumerate(ordered):  # Holm-Bonferroni over the same family
        running = max(running, min(1.0, (len(ordered) - i) * v["u_p"]))
        v["u_holm"] = running
    return out


def point(s: dict) -> float:
    """A method's level: the IQM with MIN_SEEDS seeds or more, else the mean."""
    return s["iqm"] if "iqm" in s else s["mean"]


def verdict(stats: dict, a: str, b: str) -> tuple[str, str]:
    """('holds' | 'reversed' | 'not resolved' | 'not testable', its line) for the claim a > b."""
    ms = stats["methods"]
    if (a, b) not in stats["poi"]:
        have = ", ".join(f"{m}: {ms[m]['n'] if m in ms else 0}" for m in (a, b))
        return "not testable", (f"not testable (finished seeds {have}; the rule needs {MIN_SEEDS} of each)")
    poi = stats["poi"][(a, b)]
    p, (lo, hi), holm = poi["p"], poi["ci"], poi["u_holm"]
    state = "holds" if lo > 0.5 else "reversed" if hi < 0.5 else "not resolved"
    text = {"holds": "**holds**", "reversed": f"**reversed** (`{b}` > `{a}` holds)",
            "not resolved": "not resolved (the CI includes 0.5)"}[state]
    check = ("; the Mann-Whitney test agrees" if (holm < ALPHA) == (state != "not resolved") else
             "; **the Mann-Whitney test does not confirm it**" if holm >= ALPHA else "; the Mann-Whitney test rejects P = 0.5")
    return state, (f"{text}: P({a} > {b}) = {p:.2f} [{lo:.2f}, {hi:.2f}]; Mann-Whitney p = {poi['u_p']:.3f}, "
                   f"Holm-adjusted {holm:.3f}{check}; IQM {ms[a]['iqm']:.1f} against {ms[b]['iqm']:.1f}")


def claim_lines(stats: dict, present: set) -> list[str]:
    """The table's claims by the verdict rule, the paper's ranking (every step must hold), and the relative difference
    of the means against the paper's gains."""
    lines, ms, states = [], stats["methods"], {}
    for a, b in claims(present):
        states[(a, b)], text = verdict(stats, a, b)
        lines.append(f"- `{a}` > `{b}`: {text}")
    for suffix in sorted({m.partition(" ")[2] for m in present}):
        names = [" ".join(filter(None, [v, suffix])) for v in RANKING]
        steps = [states.get((a, b)) for a, b in zip(names, names[1:])]
        if all(s is not None for s in steps):
            held = sum(s == "holds" for s in steps)
            ranking = ("**holds** (every step holds)" if held == len(steps) else
                       "not testable" if "not testable" in steps else f"does not hold ({held} of {len(steps)} steps hold)")
            lines.append(f"- the ranking {' > '.join(f'`{n}`' for n in names)}: {ranking}")
        for b, paper in [*PAPER_GAIN.items(), (BASELINE, None), ("bc", None)]:
            a, bb = names[0], " ".join(filter(None, [b, suffix]))
            if a in ms and bb in ms and ms[bb]["mean"]:
                gain = 100 * (ms[a]["mean"] - ms[bb]["mean"]) / abs(ms[bb]["mean"])
                lines.append(f"- mean of `{a}` (n={ms[a]['n']}) relative to `{bb}` (n={ms[bb]['n']}): {gain:+.1f} %"
                             + (f" (paper: +{paper} %)" if paper is not None else ""))
    return lines
