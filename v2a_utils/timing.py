# Time for v2a_iql.py and v2a_td3bc.py: --bench's timing of each stage, and the estimate a run prints when it starts,
# from the rates of the docs' CPU scaled by a short probe of this machine. Nothing here changes what a run computes.
# docs: docs/speed.md
import time

import torch
import torch.utils.flop_counter

from v2a_utils.shifts import robot_of


def bench_stage(name: str, step_fn, steps: int, warmup: int = 20, matmul_gflops: float = 0.0):
    """Print the rate of `step_fn` over a timed window after `warmup` calls (compilation happens there), and the
    achieved GFLOP/s (FLOPs counted on one eager call by FlopCounterMode) against the measured matmul rate."""
    t0 = time.perf_counter()
    for i in range(warmup):
        out = step_fn(i + 1)
    out.tolist()  # waits for the device
    t1 = time.perf_counter()
    for i in range(steps):
        out = step_fn(warmup + i + 1)
    out.tolist()
    dt = time.perf_counter() - t1
    with torch.utils.flop_counter.FlopCounterMode(display=False) as counter, torch.compiler.set_stance("force_eager"):
        step_fn(warmup + steps + 1)
    gflop = counter.get_total_flops() / 1e9
    roof = f" = {100 * gflop * steps / dt / matmul_gflops:.0f} % of the matmul rate" if matmul_gflops else ""
    print(f"bench {name}: {steps / dt:.1f} steps/s ({1000 * dt / steps:.2f} ms/step; warm-up {t1 - t0:.1f} s); "
          f"{gflop:.3f} GFLOP/step, {gflop * steps / dt:.0f} GFLOP/s{roof}", flush=True)


def matmul_rate(dev: torch.device, m: int = 192, k: int = 256, n: int = 256, seconds: float = 1.0) -> float:
    """GFLOP/s of an fp32 [m, k] x [k, n] matmul, the largest shape of the stage-5 update: the roofline reference."""
    a, b, reps = torch.randn(m, k, device=dev), torch.randn(k, n, device=dev), 0
    (a @ b).sum().item()
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(100):
            c = a @ b
        c.sum().item()
        reps += 100
    return 2 * m * k * n * reps / (time.perf_counter() - t0) / 1e9


# Rough rates of the stages on the 2-core CPU of the docs, one thread, another run on the other core, read off the
# README's reduced-budget runs and docs/speed.md. Stage 1's are trajectory steps per second: the GRU and the decoder
# skip the padding after an episode's end, so an iteration costs the summed lengths of its crops (many short random
# episodes: cheap; the crossed mixture's long ones: 3.5x Hopper's default). The rates are the iterations/s measured on
# each robot's default mixture times its crop steps per iteration. Stage 5's include its evaluations. The estimate
# scales them by machine_speed(): another CPU, or this one with other work on its cores, runs at other rates (a fresh
# cloud machine ran stage 1 at half of them). Stage 5's predate its faster matrix products (docs/speed.md: the compiled
# step 1.7-1.9x as fast; the evaluations are not): until they are measured again, its estimate errs long.
CPU_RATES = dict(tc_elbo={"Hopper": 9000.0, "Walker2d": 4900.0, "HalfCheetah": 5800.0, "Ant": 4800.0}, sql=100.0, info=200.0,
                 ot_seconds_per_million_rows=350.0, vae=40.0, stage5={"v2a_iql.py": 200.0, "v2a_td3bc.py": 240.0},
                 stage5_dataset_constraint=8.6)


# machine_probe()'s rate that goes with CPU_RATES: the probe and `--bench` of a default Hopper v2a run in one process on
# the docs' CPU (2026-12-07, twice, two other runs on its two cores): probe 229-277 it/s, mean 247, while stage 1 ran at
# 0.71-0.74x its rate above, stage 3 at 0.93-0.95x and stage 5 at 1.1x docs/speed.md's --bench rate; weighted by their
# share of a default run (stage 1 two thirds, stage 5 one third), 0.83x, so 247 / 0.83
PROBE_RATE = 300.0


def machine_probe(dev: torch.device, seconds: float = 0.25) -> float:
    """Iterations/s of a small fixed workload shaped as a run's (an MLP's and a 20-step GRU-like recurrence's forward
    and gradients, one thread as the run has), for `seconds` (at least 5 iterations). Its tensors come from a generator
    of its own: the run's RNG streams are untouched, and so is what the run computes."""
    g = torch.Generator(device=dev).manual_seed(0)
    shapes = ((32, 256), (256, 256), (256, 1), (64, 192))
    w = [(torch.randn(i, o, generator=g, device=dev) / i ** 0.5).requires_grad_() for i, o in shapes]
    x, n, t0 = torch.randn(256, 32, generator=g, device=dev), 0, time.perf_counter()
    while (elapsed := time.perf_counter() - t0) < seconds or n < 5:
        h = torch.relu(torch.relu(x @ w[0]) @ w[1]) @ w[2]
        state = torch.zeros(16, 64, device=dev)
        for _ in range(20):
            r, z, c = (state @ w[3]).chunk(3, 1)
            state = torch.tanh(c * torch.sigmoid(r)) * torch.sigmoid(z) + 0.5 * state
        torch.autograd.grad(h.square().mean() + state.square().mean(), w)[0].sum().item()  # .item(): waits for the device
        n += 1
    return n / elapsed


def machine_speed(dev: torch.device) -> float:
    """This machine's speed against the CPU of CPU_RATES (1: the same; 0.5: stages take twice as long), measured now
    by machine_probe: the CPU, its load and the thread count as the run will have them."""
    return machine_probe(dev) / PROBE_RATE


def estimate(args, script: str, stages: tuple, loaded: dict, dev: torch.device, crop_steps: float,
             speed: float = 1.0) -> str:
    """One line: the time that the stages this process trains will take at CPU_RATES times `speed` (machine_speed),
    from the flags' budgets and `crop_steps`, the mean trajectory steps of one TC-ELBO iteration on these data."""
    r, constraint = CPU_RATES, getattr(args, "dataset_constraint", 0.0) > 0  # an IQL-only flag
    start = loaded[5][1]["step"] if 5 in loaded else 0
    stage1_rate = r["tc_elbo"].get(robot_of(args.env_id), 5000.0) / crop_steps
    seconds = {1: args.repr_steps / stage1_rate, 3: args.sql_steps / r["sql"],
               4: args.info_steps / r["info"] if args.dynamics_score == "contrastive"
               else r["ot_seconds_per_million_rows"] * args.source_size / 1e6,
               5: (args.vae_steps / r["vae"] if constraint and start == 0 else 0.0) + max(0, args.total_steps - start)
               / (r["stage5_dataset_constraint"] if constraint else r["stage5"].get(script, 200.0))}
    todo = {k: t / speed for k, t in seconds.items()
            if k in stages and k not in loaded or k == 5 and start < args.total_steps and not args.filter_only}
    span = lambda t: f"{t:.0f} s" if t < 60 else f"{t / 60:.0f} min" if t < 3600 else f"{t / 3600:.1f} h"
    scale = (f"scaled by this machine's speed, {speed:.2f}x that CPU's by a quarter-second probe" if dev.type == "cpu"
             else "this GPU is faster, and each stage prints its own ETA")
    parts = ", ".join(f"stage {k} {span(t)}" for k, t in todo.items()) or "nothing but the final evaluation"
    return (f"estimate (rough): about {span(sum(todo.values()))} to train ({parts}); the stage rates of the docs' 2-core "
            f"CPU (docs/speed.md), {scale}")
