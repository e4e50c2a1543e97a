# The small files of a benchmark run, committed under results/<sweep>/<run name>/: written from a finished (or stopped)
# run by export_run (benchmark.py after each run, and its report before reading), and read back by load_runs as the
# report's tasks and methods. docs: docs/benchmark.md
import csv
import glob
import json
import os
import time
from typing import Optional

import numpy as np

TASK_FLAGS = ("env_id", "target_size", "source", "source_size")  # with the script: what makes a task (not a method)
# the backbone's input scaling and actor settings (flags newer than the Hopper sweep): part of the task, not a method
NORM_FLAGS = ("normalize_states", "reward_scale", "awr_clip", "actor_schedule")


def trainer_dir(run_dir: str) -> Optional[str]:
    """The training script's own run directory inside the run folder (the newest with args.json)."""
    dirs = [d for d in glob.glob(os.path.join(run_dir, "runs", "*")) if os.path.exists(os.path.join(d, "args.json"))]
    return max(dirs, key=os.path.getmtime) if dirs else None


def read_json(path: str):
    try:
        with open(path) as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


def write_json(path: str, obj):
    with open(path + ".tmp", "w") as fh:
        json.dump(obj, fh, indent=1)
    os.replace(path + ".tmp", path)


def export_run(run_dir: str, dest: str, max_points: int = 250):
    """run.json (the runner's record), args.json, results.json, curves.csv (tag, step, value; every tag thinned to
    <= max_points steps, evaluations never), z_pca.csv (the 2-D PCA of the z embedding, label columns), adv_hist.csv
    (the advantage histograms per domain-quality, summed over the steps: the scorers are frozen in stage 5)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tdir = trainer_dir(run_dir)
    if tdir is None:
        return
    os.makedirs(dest, exist_ok=True)
    record = read_json(os.path.join(run_dir, "benchmark.json")) or {}
    attempts = record.get("attempts", [])
    ea = EventAccumulator(tdir, size_guidance={"scalars": 0, "histograms": 0, "tensors": 0},  # 0: keep every event
                          purge_orphaned_data=False).Reload()  # the scripts' --resume already cut what they log again
    wall = [e.wall_time for tag in ea.Tags()["scalars"] for e in ea.Scalars(tag)]
    write_json(os.path.join(dest, "run.json"), dict(
        spec={k: v for k, v in record.get("spec", {}).items() if k not in ("run_dir", "export_dir", "env", "script")},
        script=os.path.basename(record.get("spec", {}).get("script", "")), trainer_dir=os.path.basename(tdir),
        attempts=[{k: a.get(k) for k in ("start", "end", "rc", "state", "machine", "code", "killed") if k in a}
                  for a in attempts],  # an attempt in flight has no end yet: it counts until now
        wall_s=sum((a["end"] or time.time()) - a["start"] for a in attempts) if attempts else
        (max(wall) - min(wall) if wall else None)))
    for f in ("args.json", "results.json"):
        if os.path.exists(os.path.join(tdir, f)):
            write_json(os.path.join(dest, f), read_json(os.path.join(tdir, f)))
    with open(os.path.join(dest, "curves.csv"), "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["tag", "step", "value"])
        for tag in sorted(ea.Tags()["scalars"]):
            pts = sorted({e.step: e.value for e in ea.Scalars(tag)}.items())  # one value per step (the last)
            if len(pts) > max_points and not tag.startswith("eval/"):
                pts = [pts[i] for i in sorted(set(np.linspace(0, len(pts) - 1, max_points).round().astype(int)))]
            w.writerows([tag, s, f"{v:.6g}"] for s, v in pts)
    hists = [t for t in ea.Tags()["histograms"] if t.startswith("filter/adv/")]
    if hists:
        with open(os.path.join(dest, "adv_hist.csv"), "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["group", "right_edge", "count"])
            for tag in sorted(hists):
                counts: dict = {}
                for e in ea.Histograms(tag):
                    h = e.histogram_value
                    for lim, c in zip(h.bucket_limit, h.bucket):
                        counts[lim] = counts.get(lim, 0.0) + c
                w.writerows([tag.split("/", 2)[2], f"{lim:.6g}", f"{c:g}"] for lim, c in sorted(counts.items()))
    emb = sorted(glob.glob(os.path.join(tdir, "*", "z", "tensors.tsv")))
    if emb:
        z = np.loadtxt(emb[-1], delimiter="\t", ndmin=2)
        with open(os.path.join(os.path.dirname(emb[-1]), "metadata.tsv")) as fh:
            labels = [line.rstrip("\n").split("/", 1) for line in fh if line.strip()]
        zc = z - z.mean(0)
        _, sv, vt = np.linalg.svd(zc, full_matrices=False)  # PCA: the top-2 right singular vectors
        pcs, var = zc @ vt[:2].T, sv**2 / max(1e-12, (sv**2).sum())
        with open(os.path.join(dest, "z_pca.csv"), "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["pc1", "pc2", "domain", "quality", f"var1={var[0]:.4f}", f"var2={var[1] if len(var) > 1 else 0:.4f}"])
            w.writerows([f"{a:.5g}", f"{b:.5g}", *lab] for (a, b), lab in zip(pcs, labels))


def load_runs(folder: str) -> list[dict]:
    """Exported runs: dicts with the task, the method, finished or not, the score and how it was measured, the periodic
    evaluations, the curves and the record."""
    runs = []
    for d in sorted(glob.glob(os.path.join(folder, "*", "run.json"))):
        d = os.path.dirname(d)
        rec, args, res = (read_json(os.path.join(d, f)) for f in ("run.json", "args.json", "results.json"))
        if not args:
            continue
        script = (args.get("script") or rec.get("script") or "?").removesuffix(".py")
        grid = rec.get("spec", {}).get("grid", {})
        task = (script, args.get("env_id"), args.get("target_size"), args.get("source"), args.get("source_size"),
                tuple((k, args[k]) for k in NORM_FLAGS if k in args))
        extra = [f"{k}={v}" for k, v in grid.items() if k.replace("-", "_") not in TASK_FLAGS + NORM_FLAGS]
        # finished: results.json reached --total-steps; an export of a killed run has none and is counted, not scored
        finished = bool(res and res.get("evals") and res["evals"][-1][0] >= args.get("total_steps", 0))
        evals = [e[2] for e in res["evals"]] if finished else []  # [step, return, normalized score] per evaluation
        final = (res or {}).get("final_eval") if finished else None
        curves: dict = {}
        if os.path.exists(os.path.join(d, "curves.csv")):
            with open(os.path.join(d, "curves.csv")) as fh:
                for row in csv.DictReader(fh):
                    curves.setdefault(row["tag"], []).append((int(row["step"]), float(row["value"])))
        runs.append(dict(dir=d, name=os.path.basename(d), task=task, variant=args.get("variant"), seed=args.get("seed"),
                         method=" ".join([args.get("variant", "?"), *extra]), args=args, rec=rec, finished=finished,
                         # the score: the final evaluation (its own seeds); runs that predate it, the last periodic
                         # evaluation (labelled so on the page)
                         score=(final["normalized_score"] if final else evals[-1]) if finished else None,
                         final=final, evals=evals, curves=curves, accuracy=(res or {}).get("filter_accuracy"),
                         filter_only=bool((res or {}).get("filter_only")),
                         data_level=(res or {}).get("target_data_normalized_score") if finished else None))
    return runs
