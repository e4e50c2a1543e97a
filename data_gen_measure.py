# `python data_gen.py --measure-episodes N` (docs/data_gen.md): the returns of each mixture entry's behaviour policy in
# its own domain, normalized against the target's reference scores; no data are written. data_gen.main imports this
# module only for that flag, so `import data_gen` stays light.
import time

from data_gen import Args, evaluate_policy, load_actor, make_domain_env, parse_source


def reference_scores(args: Args, robot: str) -> tuple[float, float]:
    """The target's `ref_min_score` and `ref_max_score`, measured as the target dataset stores them (same seeds)."""
    eval_env = make_domain_env(args.env_id, "nominal")
    expert, _ = load_actor(args, robot, "nominal", "expert")
    ref_min = evaluate_policy(eval_env, None, args.ref_min_episodes, seed=args.seed + 123).mean()
    ref_max = evaluate_policy(eval_env, expert, args.ref_max_episodes, seed=args.seed + 456).mean()
    return float(ref_min), float(ref_max)


def measure(args: Args, robot: str) -> list[dict]:
    """`--measure-episodes N`: the return of each mixture entry's behaviour policy in its own domain, on N episodes
    (reset seeds 20000 + seed onwards), with deterministic actions and with sampled ones (as the data are collected),
    and its normalized score 100 (R - ref_min) / (ref_max - ref_min) against the target's reference scores."""
    import torch

    n, seed = args.measure_episodes, 20_000 + args.seed
    for domain, quality, _ in parse_source(args.source):
        load_actor(args, robot, domain, quality)  # every policy file first: a missing one stops before any episode
    t0 = time.time()
    ref_min, ref_max = reference_scores(args, robot)
    norm = lambda r: 100 * (r - ref_min) / (ref_max - ref_min)
    print(f"{args.env_id} target reference scores: ref_min_score {ref_min:.1f} (uniform random policy, "
          f"{args.ref_min_episodes} episodes), ref_max_score {ref_max:.1f} (nominal expert, {args.ref_max_episodes} "
          f"deterministic episodes)")
    print(f"returns of each entry's behaviour policy in its own domain, {n} episodes (reset seeds {seed}-{seed + n - 1}),"
          f" mean +- sd (normalized score)")
    print(f"  {'domain:quality':24s} {'deterministic actions':>30s} {'sampled actions (as collected)':>32s}")
    rows = []
    for domain, quality, _ in dict.fromkeys(parse_source(args.source)):
        env = make_domain_env(args.env_id, domain)
        actor, _ = load_actor(args, robot, domain, quality)
        det = evaluate_policy(env, actor, n, seed=seed)
        torch.manual_seed(seed)
        sampled = evaluate_policy(env, actor, n, seed=seed, deterministic=False)
        rows.append(dict(domain=domain, quality=quality, deterministic=det, sampled=sampled))
        cell = lambda r: f"{r.mean():8.1f} +- {r.std():6.1f} ({norm(r.mean()):5.1f})"
        print(f"  {domain + ':' + quality:24s} {cell(det):>30s} {cell(sampled):>32s}", flush=True)
    print(f"measured in {time.time() - t0:.0f} s")
    return rows
