# The screen table of docs/v2a_iql.md ("The backbone") from the exported runs in this folder:
#   python results/backbone/table.py
import glob
import json
import os
import statistics

HERE = os.path.dirname(os.path.abspath(__file__))
# the official release's backbone flags: the table names what differs from them
RELEASE = dict(gamma=0.99, tau=0.005, temperature=3.0, expectile=0.7, awr_clip=100.0, actor_schedule="cosine",
               normalize_states=False, reward_scale="none", alpha=2.5, target_size=100_000, source_size=1_000_000,
               sql_gamma=None, sql_tau=None)  # stage 3's: None follows --gamma / --tau, as the release
rows: dict = {}
for path in sorted(glob.glob(os.path.join(HERE, "*__s*", "results.json"))):
    name, seed = os.path.basename(os.path.dirname(path)).rsplit("__s", 1)
    res = json.load(open(path))
    args = json.load(open(os.path.join(os.path.dirname(path), "args.json")))
    rows.setdefault(name, []).append((int(seed), res, args))

print("| run | script | variant and flags that differ from the release's | steps | seeds | last periodic score per seed "
      "| final 50-episode score per seed | mean final |")
print("|---|---|---|---|---|---|---|---|")
for name, runs in rows.items():
    runs.sort(key=lambda r: r[0])
    args = runs[0][2]
    flags = [f"--{k.replace('_', '-')} {v}" for k, v in args.items() if k in RELEASE and v != RELEASE[k]]
    if args.get("reuse_stages"):  # runs/<env>__<exp name>__<row>__<seed>__<time>
        flags.append(f"(stages 1-4 from the {args['reuse_stages'].split('__')[1]} run of this seed)")
    last = ", ".join(f"{r['last_eval_normalized_score']:.1f}" for _, r, _ in runs)
    final = ", ".join(f"{r['final_normalized_score']:.1f}" for _, r, _ in runs)
    mean = statistics.mean(r["final_normalized_score"] for _, r, _ in runs)
    print(f"| {name} | {args['script']} | {args['variant']}: {' '.join(flags) or 'the release'} | {args['total_steps']:,} | "
          f"{', '.join(str(s) for s, _, _ in runs)} | {last} | {final} | {mean:.1f} |")
