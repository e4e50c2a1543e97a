# Heterogeneous cross-domain offline datasets for V2A, stored with Minari.
# docs: docs/data_gen.md    method: docs/specification.md §3 and §14 (items 1-2)
"""Generate a heterogeneous source mixture (several dynamics-shifted domains, each collected by its own
behaviour policy) and a small target dataset in the nominal environment.

    python data_gen.py --env-id Hopper-v4                      # datasets, with the committed behaviour policies
    python data_gen.py --env-id Hopper-v4 --train-domain nominal   # train the behaviour policies of one domain
"""
import contextlib
import fcntl
import inspect
import json
import math
import os
import random
import shutil
import signal
import sys
import time
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

from v2a_utils.processes import datasets_root, parent_now, probe_path, remove_stale, staging_dir, tie_to_parent

# Who started this process, read before the imports below take their second or two: tie_to_parent() needs the parent as
# it was then (one killed meanwhile is gone from /proc, and this process has a new parent).
PARENT_AT_START = parent_now()

# Nothing imported here needs more than gymnasium, mujoco and numpy: `recover_environment()` of a stored dataset imports
# this module (the entry point data_gen:make_shifted_env, re-exported below), and must work with those alone. torch,
# tyro and minari are imported where data are collected, policies run or flags are parsed (docs/data_gen.md, "Using the
# datasets outside").
import gymnasium as gym  # noqa: E402
import mujoco  # noqa: E402
import numpy as np  # noqa: E402

from v2a_utils import mixtures  # noqa: E402
from v2a_utils.behaviour import (  # noqa: E402
    SAC_WARMUP_STEPS,
    check_policies,
    load_actor,
    measure,
    policy_act,
    policy_path,
    reference_scores,
    train_behaviour_policies,
)
from v2a_utils.data_truth import GAP_KEY, GapProbe, gap_report, provenance_metadata  # noqa: E402
from v2a_utils.errors import DataGenError, no_space, one_line  # noqa: E402
from v2a_utils.mixtures import (  # noqa: E402
    MAX_DATASET_TRANSITIONS,
    TARGET,
    Entry,
    dataset_ids,
    entry_label,
    entry_sizes,
    min_source_size,
    parse_source,
    policy_fields,
    resolve_source,
)
from v2a_utils.shifts import ROBOTS, check_domain, domain_names, make_domain_env, robot_of  # noqa: E402

# the entry point that every source dataset stores: `data_gen:make_shifted_env` (v2a_utils.shifts.ENTRY_POINT)
from v2a_utils.shifts import make_shifted_env as make_shifted_env  # noqa: E402

if TYPE_CHECKING:
    from v2a_utils.sac import Actor


@dataclass
class Args:
    """Generate V2A's heterogeneous cross-domain datasets with Minari: a source mixture of dynamics-shifted domains,
    each collected by its own behaviour policy (random, medium or expert), and a medium-quality target dataset of
    the nominal env, with reference scores. Example: `python data_gen.py --env-id Hopper-v4` (1M source and 100k
    target transitions, 4 to 8 min on a 2-core CPU, with progress lines; written under $MINARI_DATASETS_PATH, default
    ~/.minari/datasets). Supported env ids: Hopper, Walker2d, HalfCheetah, Ant, each -v4 or -v5; each robot has a
    default mixture (DEFAULT_SOURCES in v2a_utils/mixtures.py). `--train-domain DOMAIN` instead trains the behaviour
    policies of a domain (SAC, about 45-60 min). Details: docs/data_gen.md."""

    env_id: str = "Hopper-v4"
    """the nominal (target) environment: Hopper, Walker2d, HalfCheetah or Ant, version v4 or v5"""
    source: Optional[str] = None
    """comma-separated `domain:quality[@policy_domain][:weight]`, quality random|medium|expert, weight finite > 0;
    `@policy_domain` collects the entry with that domain's policy instead of its own (e.g. friction-0.5:expert@nominal:
    the nominal expert acting in friction-0.5, a stand-in where the domain has no policy: not an expert there); or a
    named mixture (`crossed`: Hopper's two domains x two qualities, NAMED_SOURCES); None: the robot's default"""
    source_size: int = 1_000_000
    """total transitions of the source mixture, split across entries by weight"""
    target_size: int = 100_000
    """transitions of the medium-quality target dataset (the paper's 10% regime; 5000 is the low-data regime)"""
    seed: int = 0
    """seed of the data collection (environments, action sampling), in [0, 2^31) as for the training scripts"""
    overwrite: bool = False
    """replace datasets that already exist under the same ids"""
    policy_dir: Optional[str] = None
    """where behaviour-policy actors are read from and written to; None: the committed `policies` folder beside
    data_gen.py, from any working directory (a path given here is relative to the working directory)"""
    ref_min_episodes: int = 100
    """episodes of the uniform random policy that measure `ref_min_score` in the target env"""
    ref_max_episodes: int = 20
    """episodes of the expert that measure `ref_max_score` in the target env"""
    measure_episodes: int = 0
    """> 0: write no data; measure each mixture entry's behaviour policy in its domain on this many episodes
    (deterministic and sampled actions) and print the returns with their normalized scores"""
    gap_figure: Optional[str] = None
    """after generating (or reusing) the datasets, draw each source dataset's distribution of the true dynamics gap
    into this file (.png, .pdf or .svg) and print its numbers (docs/data_gen.md, "The true dynamics gap")"""
    # behaviour-policy training (only with --train-domain)
    train_domain: Optional[str] = None
    """train the medium and expert behaviour policies of this domain (e.g. `nominal`, `torso-hard`), not data"""
    policy_steps: int = 300_000
    """environment steps of the SAC run that trains a behaviour policy"""
    policy_eval_freq: int = 10_000
    """evaluate (and keep a checkpoint of) the SAC actor every this many steps"""
    threads: int = 1
    """torch CPU threads"""


def description() -> str:
    """--help's text: Args' docstring and the shifts of every robot (made from ROBOTS: exactly what check_domain
    accepts)."""
    common = ", ".join(d for d in domain_names("Hopper") if d.startswith(("gravity-", "friction-")))
    own = "; ".join(f"{robot} " + ", ".join([*parts["joints"], *parts["parts"]]) for robot, parts in ROBOTS.items())
    return (f"{inspect.cleandoc(Args.__doc__)}\n\nShifts (the domains of --source and --train-domain; nominal: the "
            f"target's own dynamics): {common} for every robot; and each robot's joint ranges and limbs, as <name>-easy, "
            f"<name>-medium or <name>-hard (e.g. legjnt-hard): {own}.")


def __getattr__(name: str):
    # `data_gen.Actor` (PEP 562): the behaviour policies' actor class lives in v2a_utils/sac.py, which imports torch;
    # looking it up here imports it only when someone asks, so loading a shifted env never needs torch
    if name == "Actor":
        from v2a_utils.sac import Actor
        return Actor
    raise AttributeError(f"module 'data_gen' has no attribute {name!r}")


# --------------------------------------------------------------------------------------------------------------
# Argument checks: every bad input is one line on stderr, before anything is read, trained or written
# --------------------------------------------------------------------------------------------------------------
COLLECT_RATE = 4500  # transitions/s of a default Hopper run on the 2-core CPU (1.1M transitions in 4 min 5 s)
DIMS = {"Hopper": (11, 3), "Walker2d": (17, 6), "HalfCheetah": (17, 6), "Ant": (27, 8)}  # observation, action


def disk_bytes(robot: str, n: int) -> float:
    """A lower bound, measured with Minari's hdf5 storage: float32 observations and actions, float64 rewards, two
    flags, and about 15 KB per episode, counted here for 1000-step episodes (the default Hopper datasets: 89 to 97
    bytes per transition with medium and expert policies, 495 with the random policy's 34-step episodes)."""
    return n * (4 * sum(DIMS[robot]) + 10 + 15)


def check_size(robot: str, what: str, n: int):
    if n > MAX_DATASET_TRANSITIONS:
        raise DataGenError(
            f"{what} would get {n:,} transitions, above the cap of {MAX_DATASET_TRANSITIONS:,} per dataset: it would "
            f"take about {n / COLLECT_RATE / 3600:,.1f} h to collect on a 2-core CPU (~{COLLECT_RATE:,} "
            f"transitions/s measured with Hopper) and at least {disk_bytes(robot, n) / 1e9:,.1f} GB on disk (about 6 "
            f"times that for a random policy's short episodes)")


def check_policy_domain(robot: str, entry: Entry):
    """The domain named after `@`: nominal or a shift of the robot (whether its policy file exists, plan() checks)."""
    try:
        check_domain(robot, entry.policy)
    except DataGenError:
        raise DataGenError(f"source entry '{entry_label(*entry)}': unknown policy domain {entry.policy!r} after '@' for "
                           f"{robot}; known: {', '.join(domain_names(robot))}") from None


def validate_args(args: Args, robot: str):
    """All argument checks, before any work (no file is read or written here)."""
    if not 0 <= args.seed < 2 ** 31:
        raise DataGenError(f"--seed {args.seed}: must lie in [0, 2^31), as for the training scripts")
    if args.threads < 1:
        raise DataGenError(f"--threads {args.threads}: must be at least 1")
    if args.policy_steps < 1:
        raise DataGenError(f"--policy-steps {args.policy_steps}: must be at least 1")
    if not 1 <= args.policy_eval_freq <= args.policy_steps:
        raise DataGenError(f"--policy-eval-freq {args.policy_eval_freq}: must be between 1 and --policy-steps "
                           f"({args.policy_steps})")
    for flag, value in (("--ref-min-episodes", args.ref_min_episodes), ("--ref-max-episodes", args.ref_max_episodes)):
        if value < 1:
            raise DataGenError(f"{flag} {value}: must be at least 1")
    if args.measure_episodes < 0:
        raise DataGenError(f"--measure-episodes {args.measure_episodes}: must be at least 0 (0: generate data)")
    if args.gap_figure is not None and (args.measure_episodes or args.train_domain or not args.gap_figure.endswith(
            (".png", ".pdf", ".svg"))):
        raise DataGenError(f"--gap-figure {args.gap_figure!r}: a .png, .pdf or .svg file, with neither "
                           f"--measure-episodes nor --train-domain")
    if args.train_domain is not None:
        check_domain(robot, args.train_domain)
    entries = parse_source(args.source)
    for entry in entries:
        if entry.domain == "nominal":
            raise DataGenError("the source mixture must contain shifted domains only (nominal is the target)")
        check_domain(robot, entry.domain)
        check_policy_domain(robot, entry)
    if not math.isfinite(sum(e.weight for e in entries)):
        raise DataGenError(f"--source {args.source!r}: the weights sum to infinity; use smaller weights")
    if args.target_size < 1:
        raise DataGenError(f"--target-size {args.target_size}: the target dataset would get no transition; "
                           f"the minimum is 1")
    if args.source_size < 1:
        raise DataGenError(f"--source-size {args.source_size}: must be a positive number of transitions; the minimum "
                           f"--source-size for this mixture is {min_source_size(entries)}")
    for entry, n in zip(entries, entry_sizes(entries, args.source_size)):
        if n < 1:
            raise DataGenError(
                f"--source-size {args.source_size}: source entry '{entry_label(*entry)}' would get no transition "
                f"(int({args.source_size} * {entry.weight:g} / {sum(e.weight for e in entries):g}) = {n}); the minimum "
                f"--source-size for this mixture is {min_source_size(entries)}")
        check_size(robot, f"--source-size {args.source_size}: source entry '{entry_label(*entry)}'", n)
    check_size(robot, f"--target-size {args.target_size}: the target dataset", args.target_size)


# --------------------------------------------------------------------------------------------------------------
# Collection and storage
# --------------------------------------------------------------------------------------------------------------
def collect(env: gym.Env, actor: Optional["Actor"], n_transitions: int, seed: int, options: dict, probe=None):
    """Whole episodes until `n_transitions`; the last episode is cut there (flagged as truncated), so no
    transition spans two episodes. Actions are sampled from the stochastic policy, as D4RL's were. The torch RNG
    (the policy's action noise) is seeded here too, so a dataset's data depend only on `seed` and its policy, not
    on what ran before (which other datasets existed, how many actors were loaded). `probe` (a
    v2a_utils.data_truth.GapProbe) measures each row's true dynamics gap, stored in the episode's infos."""
    import torch
    from minari.data_collector.episode_buffer import EpisodeBuffer

    torch.manual_seed(seed)
    rng, buffers, count, ep, start, next_report = np.random.default_rng(seed), [], 0, 0, time.time(), 0.25
    while count < n_transitions:
        if count >= next_report * n_transitions:
            eta = (time.time() - start) * (n_transitions - count) / count
            print(f"      {count}/{n_transitions} transitions, ETA {eta:.0f} s", flush=True)
            next_report += 0.25
        obs, _ = env.reset(seed=seed + ep)
        o, a, r, te, tr, gap = [obs], [], [], [], [], []
        while True:
            act = policy_act(actor, obs, env, rng, deterministic=False)
            if probe is not None:
                probe.record()
            obs, rew, term, trunc, _ = env.step(act)
            if probe is not None:
                gap.append(probe.gap(act, obs))
            o.append(obs), a.append(act), r.append(rew), te.append(term)
            count += 1
            tr.append(trunc or (count == n_transitions and not term))
            if te[-1] or tr[-1]:
                break
        buffers.append(EpisodeBuffer(observations=np.array(o, np.float32), actions=np.array(a, np.float32),
                                     rewards=np.array(r, np.float64), terminations=np.array(te),
                                     truncations=np.array(tr), options=options,
                                     infos=None if probe is None else {GAP_KEY: np.array(gap, np.float32)}))
        ep += 1
    return buffers


def float32_box(space: gym.spaces.Box) -> gym.spaces.Box:
    """The space as stored: observations and actions are written as float32."""
    return gym.spaces.Box(space.low.astype(np.float32), space.high.astype(np.float32), space.shape, np.float32)


ROOM_HINT = "make room there, or set MINARI_DATASETS_PATH to a folder on a disk with room"


def check_writable(root: str):
    """Create (and remove) a probe file in the datasets root and the staging folder beside it; permission bits
    say nothing when running as root, so only trying tells. A full disk fails here too, at the probe's write."""
    probe, staging = probe_path(root, os.getpid()), staging_dir(root, os.getpid())
    try:
        os.makedirs(root, exist_ok=True)
        try:
            with open(probe, "w") as f:
                f.write("probe\n")
        finally:  # also when the write failed: an empty probe would stay for good
            if os.path.exists(probe):
                os.remove(probe)
        try:  # a SIGTERM in between (main installs its handler first) still removes the probe folder
            os.makedirs(staging, exist_ok=True)
        finally:
            if os.path.isdir(staging):
                os.rmdir(staging)
    except OSError as e:
        if no_space(e):
            raise DataGenError(f"no space left on device under {root} ({one_line(e)}); {ROOM_HINT}") from None
        raise DataGenError(f"cannot write datasets under {root} ({one_line(e)}); set MINARI_DATASETS_PATH to a "
                           f"writable folder") from None


def check_space(folder: str, need: float, root: str, what: str):
    """Stop before writing `what` (about `need` bytes) into `folder` when its disk has less room: h5py writing into
    a full disk prints a traceback for every object it closes and can crash the interpreter (a segfault), so a full
    disk is caught before the write, as one line naming the datasets folder `root`."""
    free = shutil.disk_usage(folder).free
    if free < need:
        raise DataGenError(f"no space left on device under {root}: {what}: {need / 1e6:,.1f} MB needed, "
                           f"{free / 1e6:,.1f} MB free; {ROOM_HINT}")


def dataset_bytes(buffers: list) -> float:
    """The size on disk of a dataset of these episodes, from above: their arrays, Minari's hdf5 storage of about 14.4 KB
    per episode (measured on the default Hopper datasets: 132 to 9,904 episodes), and 256 KB for its metadata."""
    arrays = sum(b.observations.nbytes + b.actions.nbytes + b.rewards.nbytes + b.terminations.nbytes
                 + b.truncations.nbytes for b in buffers)
    return 1.05 * (arrays + 16_000 * len(buffers)) + 256e3


@contextlib.contextmanager
def generation_lock(root: str):
    """Exclusive lock of the datasets root for a whole generation: a second data_gen.py waits, then finds the
    datasets the first one wrote and reuses them. The lock file holds the writer's pid."""
    fd = os.open(os.path.join(root, ".v2a-data_gen.lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = ""
            for _ in range(20):  # the holder writes its pid right after it takes the lock
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
                if holder:
                    break
                time.sleep(0.05)
            print(f"waiting for another data_gen.py (pid {holder or '?'}) writing to {root}", file=sys.stderr,
                  flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def write_dataset(dataset_id: str, staging: str, generation: dict, **create_kwargs):
    """Create the dataset in the staging root, then move it under its final id in one rename, so an interrupted
    run never leaves a half-written dataset under a final id."""
    import minari

    os.environ["MINARI_DATASETS_PATH"], previous = staging, os.environ.get("MINARI_DATASETS_PATH")
    try:
        ds = minari.create_dataset_from_buffers(dataset_id=dataset_id, **create_kwargs)
        # the generation record as before (older datasets still match it); fingerprint and machine as their own keys
        ds.storage.update_metadata({"v2a_generation": json.dumps(generation),
                                    **provenance_metadata(create_kwargs["buffer"])})
    finally:
        if previous is None:
            del os.environ["MINARI_DATASETS_PATH"]
        else:
            os.environ["MINARI_DATASETS_PATH"] = previous
    final = os.path.join(datasets_root(), dataset_id)
    os.makedirs(os.path.dirname(final), exist_ok=True)
    if os.path.exists(final):  # --overwrite: move the old one aside first (a folder cannot be renamed onto another)
        old = os.path.join(staging, ".replaced", dataset_id)
        os.makedirs(os.path.dirname(old), exist_ok=True)
        os.rename(final, old)
    os.replace(os.path.join(staging, dataset_id), final)
    shutil.rmtree(os.path.join(staging, ".replaced"), ignore_errors=True)


def episode_summary(ds) -> str:
    lengths = [m["total_steps"] for m in ds.storage.get_episode_metadata(range(ds.total_episodes))]
    returns = [float(ep.rewards.sum()) for ep in ds.iterate_episodes()]
    return (f"{ds.total_episodes:6d} episodes {ds.total_steps:8d} transitions  mean length {np.mean(lengths):6.1f}  "
            f"return {np.mean(returns):8.1f} +- {np.std(returns):7.1f}")


def generation_record(args: Args, entry: Entry, n: int) -> dict:
    """The dataset's `v2a_generation` (v2a_utils/mixtures.py): what makes it; re-running with the same values reuses it."""
    return mixtures.generation_record(args.env_id, entry, n, args.source, args.seed)


def plan(args: Args, robot: str, jobs: list) -> list:
    """The jobs (dataset id, Entry, transitions) still to collect. Checks, reading only: an existing dataset must load
    and have been made with the same arguments (unless --overwrite); every behaviour policy a job needs must exist (all
    missing ones are listed in one line) and load."""
    import minari

    todo, needed = [], []
    for job in jobs:
        dataset_id, entry, n = job
        path = os.path.join(datasets_root(), dataset_id)
        if os.path.exists(path) and not args.overwrite:
            try:
                ds = minari.load_dataset(dataset_id)
                stored = ds.storage.metadata.get("v2a_generation")
                steps = sum(m["total_steps"] for m in ds.storage.get_episode_metadata(range(ds.total_episodes)))
                if steps != ds.total_steps:
                    raise ValueError(f"its episodes hold {steps} transitions, its metadata says {ds.total_steps}")
            except Exception as e:
                raise DataGenError(f"dataset {dataset_id} at {path} cannot be loaded ({one_line(e)}): it is corrupt "
                                   f"or partial; pass --overwrite to regenerate it") from None
            if stored is None or json.loads(stored) != generation_record(args, entry, n):
                raise DataGenError(f"dataset {dataset_id} exists but was made with other arguments ({stored}); "
                                   f"pass --overwrite to replace it")
            continue
        todo.append(job)
        is_target = entry.domain == "nominal"  # the target also needs the nominal expert: the reference scores
        needed += [(entry.policy, entry.quality, None if is_target else entry)]
        needed += [("nominal", "expert", None)] if is_target else []
    check_policies(args, robot, needed)
    return todo


def generate(args: Args, robot: str):
    import minari

    entries = parse_source(args.source)
    source_ids, target_id = dataset_ids(args.env_id, args.source, args.source_size, args.target_size)
    common = dict(algorithm_name="SAC behaviour policies (data_gen.py)", author="v2a",
                  code_permalink="data_gen.py", requirements=[f"mujoco=={mujoco.__version__}"])
    jobs = [(target_id, TARGET, args.target_size),
            *zip(source_ids, entries, entry_sizes(entries, args.source_size))]
    plan(args, robot, jobs)  # check everything before the first write
    root = datasets_root()
    for path in remove_stale(root):  # before the checks: on a full disk, what a dead run left keeps it full
        print(f"removed {path}, left by a data_gen.py that is gone")
    check_writable(root)
    start = time.time()
    with generation_lock(root):
        todo = plan(args, robot, jobs)  # again: another writer may have made some while we waited
        staging = staging_dir(root, os.getpid())
        check_space(root, sum(disk_bytes(robot, n) for *_, n in todo), root,
                    f"the {len(todo)} datasets to write (a lower bound)")
        try:
            os.makedirs(staging)
            for k, job in enumerate(jobs):
                dataset_id, entry, n = job
                domain, quality = entry.domain, entry.quality
                if job not in todo:
                    print(f"[{k + 1}/{len(jobs)}] reusing {dataset_id} (pass --overwrite to regenerate)")
                    continue
                print(f"[{k + 1}/{len(jobs)}] collecting {dataset_id} ({entry_label(domain, quality, 1.0, entry.policy)}, "
                      f"{n} transitions)", flush=True)
                env, t0 = make_domain_env(args.env_id, domain), time.time()
                actor, info = load_actor(args, robot, entry.policy, quality)  # the policy's domain: its own, or @'s
                # the dynamics are the entry's domain's whichever policy acts: the true gap is measured from them
                probe = GapProbe(env, make_domain_env(args.env_id, "nominal"), same_dynamics=domain == "nominal")
                buffers = collect(env, actor, n, seed=args.seed + 1_000_000 * k, probe=probe,
                                  options={"domain": domain, "quality": quality, **policy_fields(entry)})
                kwargs = dict(common, buffer=buffers, env=env, eval_env=env.spec,
                              observation_space=float32_box(env.observation_space),
                              action_space=float32_box(env.action_space))
                policy = ("a uniform random policy" if actor is None else f"the {quality} SAC policy of that domain"
                          if not entry.foreign else f"the {quality} SAC policy of the {entry.policy} domain, a stand-in "
                          f"for {domain}'s own: not {domain}'s {quality} behaviour")
                if domain == "nominal":
                    ref_min, ref_max = reference_scores(args, robot)
                    kwargs.update(ref_min_score=ref_min, ref_max_score=ref_max, description=(
                        f"V2A target dataset: {n} transitions of {args.env_id} (the nominal dynamics) collected by "
                        f"{policy}. ref_min_score: uniform random policy, {args.ref_min_episodes} episodes; "
                        f"ref_max_score: the nominal expert, {args.ref_max_episodes} deterministic episodes. "
                        f"Seed {args.seed}."))
                else:
                    kwargs["description"] = (
                        f"V2A source component {entry_label(domain, quality, 1.0, entry.policy)} ({n} transitions, "
                        f"{policy}) of the mixture "
                        f"'{args.source}' for target {args.env_id}; shift '{domain}' applied by "
                        f"data_gen:make_shifted_env. recover_environment() imports the module data_gen of the v2a "
                        f"repository: install it once with `pip install -r requirements.txt` (or `pip install -e .`) "
                        f"in the repository. Episode metadata: options.domain, options.quality"
                        f"{', options.policy_domain' if entry.foreign else ''}. Seed {args.seed}.")
                check_space(staging, dataset_bytes(buffers), root, f"{dataset_id} ({len(buffers)} episodes)")
                try:
                    write_dataset(dataset_id, staging, generation_record(args, entry, n), **kwargs)
                except Exception as e:  # the disk filled meanwhile (another writer): one line, and the staging goes
                    if not no_space(e):
                        raise
                    raise DataGenError(f"no space left on device under {root} while writing {dataset_id} "
                                       f"({one_line(e)[:120]}); {ROOM_HINT}") from None
                print(f"      written in {time.time() - t0:.0f} s; total {time.time() - start:.0f} s", flush=True)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    print(f"\nDatasets for {args.env_id} (MINARI_DATASETS_PATH={root}):")
    for dataset_id, entry, _ in jobs:
        ds = minari.load_dataset(dataset_id)
        quality = entry.quality + (f"@{entry.policy}" if entry.foreign else "")
        print(f"  {dataset_id}\n      {entry.domain:>16s}:{quality:<7s} {episode_summary(ds)}")
    target = minari.load_dataset(target_id)
    print(f"  target ref_min_score {target.storage.metadata['ref_min_score']:.1f}  "
          f"ref_max_score {target.storage.metadata['ref_max_score']:.1f}")
    if args.gap_figure is not None:
        gap_report([(i, entry_label(e.domain, e.quality, 1.0, e.policy)) for i, e, _ in jobs[1:]], args.gap_figure,
                   title=f"{args.env_id}: source datasets of {args.source_size:,} transitions, seed {args.seed}")


def _terminate(signum, frame):
    raise SystemExit(128 + signum)  # unwinds through the `finally` blocks: the staging folder is removed


def main(args: Args):
    # warnings that tell a user nothing here: the -v4 envs are supported on purpose (README, "Robots"), and Minari asks
    # every dataset for its author's email address
    warnings.filterwarnings("ignore", message=r".*The environment .* is out of date", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=r"`author_email` is set to None", category=UserWarning)
    robot = robot_of(args.env_id)
    args.source = resolve_source(args.env_id, args.source)
    signal.signal(signal.SIGTERM, _terminate)  # first: the checks below already create (and remove) a staging folder
    validate_args(args, robot)
    if args.train_domain is not None:  # at once: the imports below and SAC's first evaluation take a while
        print(f"training the behaviour policies of {args.env_id} {args.train_domain}: SAC for {args.policy_steps:,} "
              f"steps, evaluated every {args.policy_eval_freq:,} steps, into {policy_path(args, robot, args.train_domain)}"
              f" (300k steps: about 45-60 min on one core of the 2-core CPU); progress every minute", flush=True)
        if args.policy_steps < SAC_WARMUP_STEPS:
            print(f"warning: --policy-steps {args.policy_steps:,} is below SAC's {SAC_WARMUP_STEPS:,} random warm-up "
                  f"steps: the warm-up is cut to a tenth of the run, and so short a run trains policies little better "
                  f"than random (the committed ones: 300,000 steps)", file=sys.stderr, flush=True)
    import torch

    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    if args.train_domain is not None:
        train_behaviour_policies(args, robot, args.train_domain)
        return
    if args.measure_episodes > 0:
        measure(args, robot)
        return
    generate(args, robot)


if __name__ == "__main__":
    tie_to_parent(*PARENT_AT_START)  # before any work: a trainer killed by SIGKILL must not leave this process running
    import tyro

    try:
        main(tyro.cli(Args, description=description()))
    except DataGenError as e:
        sys.exit(f"data_gen.py: error: {e}")
    except KeyboardInterrupt:
        sys.exit("data_gen.py: interrupted")
