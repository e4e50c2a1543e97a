# What a dataset of data_gen.py carries besides its arrays (docs/data_gen.md, "The true dynamics gap" and "Fingerprints
# and machines"): the true dynamics gap of every row, measured while the data are collected by stepping the nominal env
# from the row's own simulator state, and the fingerprint of the arrays with the machine that made them; and `flatten`,
# the training scripts' one pass over a dataset's episodes, which reads both back. No torch (data_gen.py imports this
# module, and must load the shifted envs without it); minari and matplotlib only where the figure is drawn.
import hashlib
import json
import math
import os
import platform
import sys

import mujoco
import numpy as np

from v2a_utils.errors import DataGenError

GAP_KEY = "true_gap"  # the per-step key of the episodes' `infos`: one float32 per row
FINGERPRINT_KEY, MACHINE_KEY = "v2a_fingerprint", "v2a_machine"  # dataset metadata, beside v2a_generation


class GapProbe:
    """The nominal env beside a domain env. `record()` before each step of the domain env keeps the simulator state the
    row starts from; `gap(action, next_obs)` after it sets the nominal env to that state, applies the same action for
    one env step and returns the Euclidean distance of its observation from the row's (float64, unscaled).
    `same_dynamics`: the domain is the nominal env itself (the target datasets), whose rows are 0 by definition; they are
    not stepped again (a tenth of a default generation's rows), and the tests check on every robot that they would be."""

    def __init__(self, domain_env, nominal_env, same_dynamics: bool = False):
        self.src, self.nom, self.same = domain_env.unwrapped, nominal_env.unwrapped, same_dynamics
        # the full integration state, not qpos/qvel alone: the constraint solver warm-starts from qacc_warmstart, and
        # only with it does a nominal row's step come out bit for bit the same
        self.spec = mujoco.mjtState.mjSTATE_INTEGRATION
        size = mujoco.mj_stateSize(self.src.model, self.spec)
        if size != mujoco.mj_stateSize(self.nom.model, self.spec):
            raise ValueError(f"the domain and nominal models have different state sizes ({size}, "
                             f"{mujoco.mj_stateSize(self.nom.model, self.spec)})")
        self.state = np.empty(size)

    def record(self):
        if not self.same:
            mujoco.mj_getState(self.src.model, self.src.data, self.state, self.spec)

    def gap(self, action: np.ndarray, next_obs: np.ndarray) -> float:
        if self.same:
            return 0.0
        mujoco.mj_setState(self.nom.model, self.nom.data, self.state, self.spec)
        self.nom.do_simulation(action, self.nom.frame_skip)  # what the env's step() does before it observes
        diff = self.nom._get_obs() - next_obs  # the nominal env's own observation function (Ant: with its options)
        return math.sqrt(float(diff @ diff))


def gap_stats(gap: np.ndarray) -> dict:
    """Mean, median, 90th percentile and share of exact zeros of one group's gaps."""
    return dict(rows=len(gap), mean=float(gap.mean()), median=float(np.median(gap)),
                p90=float(np.quantile(gap, 0.9)), zero=float((gap == 0).mean()))


# ---- Fingerprints and machines ---------------------------------------------------------------------------------------
class Fingerprint:
    """16 hex digits of a BLAKE2b hash of every episode's length, observations, actions, rewards, terminations and
    truncations, in order, in the dtypes the datasets store (so the buffers data_gen.py writes and the episodes Minari
    reads back give the same digest). Not the infos: the gap follows from these arrays and the code. `update` episode
    by episode, as they are read."""

    def __init__(self):
        self.hash = hashlib.blake2b(digest_size=8)

    def update(self, ep):
        self.hash.update(np.int64(len(ep.rewards)).tobytes())
        for x, dtype in [(ep.observations, np.float32), (ep.actions, np.float32), (ep.rewards, np.float64),
                         (ep.terminations, np.bool_), (ep.truncations, np.bool_)]:
            self.hash.update(np.ascontiguousarray(x, dtype=dtype).tobytes())

    def hexdigest(self) -> str:
        return self.hash.hexdigest()


def fingerprint(episodes) -> str:
    """The fingerprint of a dataset's episodes (Minari's) or of the buffers it is written from."""
    content = Fingerprint()
    for ep in episodes:
        content.update(ep)
    return content.hexdigest()


def flatten(ds, max_len: int = 1000):
    """Episodes -> rows [s, a, r, s', terminated], trajectory lengths (episodes cut every max_len steps), the arrays'
    fingerprint and each row's true dynamics gap (None if the dataset lacks it), in the one pass that reads them."""
    rows, lens, gaps, content = [], [], [], Fingerprint()
    for ep in ds.iterate_episodes():
        o, T = ep.observations, len(ep.actions)
        rows.append(np.concatenate([o[:-1], ep.actions, ep.rewards[:, None], o[1:], ep.terminations[:, None]], 1))
        lens.append([min(max_len, T - k) for k in range(0, T, max_len)])
        gaps.append((ep.infos or {}).get(GAP_KEY))
        content.update(ep)
    gap = None if any(g is None for g in gaps) else np.concatenate(gaps).astype(np.float32)
    return np.concatenate(rows).astype(np.float32), lens, content.hexdigest(), gap


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            names = [line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")]
        if names:
            return f"{names[0]} ({len(names)} logical CPUs)"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    """The machine a dataset is made on: generation is not bit-portable across CPUs (docs/data_gen.md). torch and
    gymnasium where they are loaded: the behaviour policies run on torch's CPU kernels, which differ between CPUs."""
    versions = {name: getattr(sys.modules.get(name), "__version__", None) for name in ("torch", "gymnasium")}
    return dict(cpu=cpu_model(), os=platform.platform(), python=platform.python_version(), numpy=np.__version__,
                mujoco=mujoco.__version__, **{k: v for k, v in versions.items() if v is not None})


def provenance_metadata(buffers) -> dict:
    """The dataset metadata keys data_gen.py adds: the fingerprint of `buffers` and this machine."""
    return {FINGERPRINT_KEY: fingerprint(buffers), MACHINE_KEY: json.dumps(machine())}


def stored_provenance(metadata: dict) -> tuple:
    """(fingerprint, machine) as a dataset stores them; None for each that a dataset made before them lacks."""
    machine_json = metadata.get(MACHINE_KEY)
    return metadata.get(FINGERPRINT_KEY), (json.loads(machine_json) if machine_json else None)


# ---- The figure: `python data_gen.py ... --gap-figure PATH` ---------------------------------------------------------
def read_gaps(dataset_id: str):
    """The gap of every row of a dataset, in row order; None for a dataset made before it was recorded."""
    import minari

    ds = minari.load_dataset(dataset_id)
    parts = [(ep.infos or {}).get(GAP_KEY) for ep in ds.iterate_episodes()]
    return None if any(p is None for p in parts) else np.concatenate(parts).astype(np.float64)


def gap_report(datasets: list[tuple[str, str]], path: str, title: str):
    """`--gap-figure PATH`: print the gap's numbers for each (dataset id, label) and draw them into `path`; a dataset
    without the gap is data_gen.py's one-line error."""
    groups = []
    for dataset_id, label in datasets:
        gap = read_gaps(dataset_id)
        if gap is None:
            raise DataGenError(f"dataset {dataset_id} holds no true dynamics gap (made before data_gen.py recorded it); pass "
                        f"--overwrite to regenerate it")
        s = gap_stats(gap)
        print(f"  true gap of {label}: {s['rows']} rows, mean {s['mean']:.4f}, median {s['median']:.4f}, 90th "
              f"percentile {s['p90']:.4f}, exactly 0 in {100 * s['zero']:.1f} %")
        groups.append((label, gap))
    gap_figure(groups, title, path)
    print(f"  wrote {path}")


def gap_figure(groups: list[tuple[str, np.ndarray]], title: str, path: str):
    """One empirical CDF per group on a log axis; rows whose gap is 0 (a log axis has no place for them; their share is
    in the legend) stand at its left edge, so a curve starts at their share. A constant gap (gravity) is a step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    # the left edge: a decade below the smallest gap that is more than rounding (a joint limit that is active but
    # carries no force leaves gaps of 1e-16); the rows below it, exact zeros included, stand at the edge
    positive = np.concatenate([g[g > 1e-9] for _, g in groups] + [np.ones(1)])
    lo = max(1e-6, 10 ** np.floor(np.log10(positive.min())))
    for label, gap in groups:
        s = gap_stats(gap)
        x = np.maximum(np.sort(gap), lo)
        ax.step(np.concatenate([[lo], x]), np.arange(len(x) + 1) / len(x), where="post",
                label=f"{label}: mean {s['mean']:.3g}, median {s['median']:.3g}, {100 * s['zero']:.0f} % exactly 0")
    ax.set(xscale="log", xlim=(lo, None), ylim=(0, 1.01), xlabel="true dynamics gap (Euclidean, observation units)",
           ylabel="share of rows with gap ≤ x", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120, metadata={"Software": None})  # no matplotlib version: the file changes only with data
    plt.close(fig)
