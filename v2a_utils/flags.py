# The training scripts' flags: the command line as tyro parses it (a flag it rejects is one line; --resume DIR alone
# takes that run's own flags), every flag checked before anything runs, and the flags' history, which keeps the runs
# and checkpoints made before a flag existed valid. docs: docs/v2a_iql.md ("Reading the code")
import contextlib
import io
import json
import math
import os
import re
import sys
from dataclasses import fields
from typing import Optional

import tyro

from v2a_utils import mixtures
from v2a_utils.errors import DataGenError, fail
from v2a_utils.mixtures import MAX_DATASET_TRANSITIONS
from v2a_utils.shifts import SUPPORTED_ENV_IDS

# ---- The flags' history: what a run made before a flag existed ran with ------------------------------------------
# flags added after runs were made: absent reads as this default
NEW_FLAG_DEFAULTS = {"dynamics_score": "contrastive", "dataset_constraint": 0.0, "vae_steps": 10_000,
                     "normalize_states": False, "reward_scale": "none", "awr_clip": 100.0, "actor_schedule": "cosine",
                     "sql_gamma": None, "sql_tau": None, "oracle": "none", "critic_layernorm": False,
                     "td_target_clip": False, "critic_grad_clip": 0.0}


REMOVED_FLAG_DEFAULTS = {"bf16": False}  # flags since removed: checkpoints made at their default stay valid


RESUME_FREE = ("exp_name", "track", "wandb_project_name", "wandb_entity", "generate", "log_freq", "resume",
               "reuse_stages", "bench", "compile", "threads", "total_steps",
               "final_eval_episodes", "filter_only")  # flags that do not change training (--total-steps may grow)


def sql_discount(args) -> tuple[float, float]:
    """Stage 3's discount and Polyak rate: --sql-gamma and --sql-tau, or the backbone's --gamma and --tau where unset
    (the release uses one value of each for both)."""
    return (args.gamma if args.sql_gamma is None else args.sql_gamma), (args.tau if args.sql_tau is None else args.sql_tau)


# ---- The command line ---------------------------------------------------------------------------------------------
def cli(args_type, description: str, argv: Optional[list] = None):
    """The command line, as tyro.cli parses it, with two differences. A flag tyro rejects is one line, as every other
    error of the scripts (tyro draws a box). With --resume DIR, a flag not given takes that run's value (its args.json;
    NEW_FLAG_DEFAULTS' for a flag newer than the run), so that --resume DIR alone continues the run as it was made; a
    flag given with another value than the run's is then refused by check_resume, as before."""
    args = parse_flags(args_type, description, argv)
    if args.resume and (own := run_flags(args.resume, args_type)) is not None:
        args = parse_flags(args_type, description, argv, default=own)
    return args


def run_flags(run_dir: str, args_type):
    """The flags a run was made with, as an `args_type`; None where its args.json cannot be read (check_resume says
    why). args.json also holds what is not a flag (script, device, datasets, ...): left out. So are the flags that
    name other runs: check_resume takes the run's --reuse-stages itself."""
    try:
        with open(os.path.join(run_dir, "args.json")) as fh:
            old = json.load(fh)
        own = {f.name: old[f.name] if f.name in old else NEW_FLAG_DEFAULTS[f.name] for f in fields(args_type)
               if (f.name in old or f.name in NEW_FLAG_DEFAULTS) and f.name not in ("resume", "reuse_stages", "bench")}
        return args_type(**own)
    except (OSError, ValueError, TypeError, AttributeError):
        return None


def parse_flags(args_type, description: str, argv: Optional[list], **kwargs):
    """tyro.cli, with its complaints as one fail() line (flag_error)."""
    args, error = flag_error(args_type, argv, description=description, **kwargs)
    if error:
        fail(f"{error}; python {os.path.basename(sys.argv[0])} --help lists the flags")
    return args


def flag_error(args_type, argv: Optional[list], **kwargs) -> tuple:
    """(args, None) from tyro.cli, or (None, what is wrong in one line): the message of tyro's error box (and the flag
    it suggests for a misspelt one), for the command line or for an earlier value of a flag given more than once
    (earlier_values). --help, and a box it cannot read, exit as tyro does. benchmark.py checks every run of a sweep with
    it before it starts any."""
    given = sys.argv[1:] if argv is None else list(argv)
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            args = tyro.cli(args_type, args=given, **kwargs)
    except SystemExit as e:
        rows = [r.strip("│ ") for r in re.sub(r"\x1b\[[0-9;]*m", "", err.getvalue()).splitlines() if r.startswith("│")]
        cut = [i for i, r in enumerate(rows) if r and set(r) == {"─"}] + [len(rows)]  # the box's section rules
        message = " ".join(r for r in rows[: cut[0]] if r)
        if "Perhaps you meant:" in rows[cut[0]: cut[0] + 2] and len(rows) > cut[0] + 2:
            message += f" (perhaps {rows[cut[0] + 2].split()[0]})"
        if e.code and message:
            return None, message.rstrip(".")
        sys.stderr.write(err.getvalue())
        raise
    sys.stderr.write(err.getvalue())  # tyro's warnings, if it gave any
    for earlier in earlier_values(args_type, given):
        if error := flag_error(args_type, earlier)[1]:
            return None, error
    return args, None


def earlier_values(args_type, argv: list) -> list[list]:
    """Each value of a flag of `args_type` that `argv` gives before the flag's last one, as a command line of its own
    (`--total-steps abc`). The last value counts, as argparse takes it, so that a flag can be given again to override
    one before it; but tyro reads the last alone, and `--total-steps abc ... --total-steps 1000` would run: these are
    parsed too."""
    names, seen = {f.name.replace("_", "-") for f in fields(args_type)}, []
    for i, a in enumerate(argv):
        flag = a[2:].partition("=")[0].replace("_", "-")
        if a.startswith("--") and flag in names:
            seen.append((flag, argv[i: i + (1 if "=" in a or i + 1 == len(argv) or argv[i + 1].startswith("--") else 2)]))
    return [tokens for k, (flag, tokens) in enumerate(seen) if any(f == flag for f, _ in seen[k + 1:])]


# ---- The checks: every flag, before anything runs (data generation included) --------------------------------------
def parse_source(spec: str) -> list[mixtures.Entry]:
    """`domain:quality[@policy_domain][:weight]` entries -> [Entry(domain, quality, weight, policy)], data_gen.py's
    grammar and messages."""
    try:
        return mixtures.parse_source(spec)
    except DataGenError as e:
        fail(str(e))


def expected_generation(args) -> dict[str, dict]:
    """Dataset id -> the generation record data_gen.py stores in it, as the flags imply it (source ids first, the
    target last). The data seed is not a flag here: it is recorded in args.json, not compared."""
    entries = parse_source(args.source)  # first: a malformed --source is one line with this program's name
    src_ids, tgt_id = mixtures.dataset_ids(args.env_id, args.source, args.source_size, args.target_size)
    record = lambda entry, n: mixtures.generation_record(args.env_id, entry, n, args.source, seed=None)
    sizes = mixtures.entry_sizes(entries, args.source_size)
    return {**{i: record(e, n) for i, e, n in zip(src_ids, entries, sizes)},
            tgt_id: record(mixtures.TARGET, args.target_size)}


def validate_args(args, variant_stages: dict, filtered: dict, backbone_errors: list[str]):
    """Every flag of a training script, checked before anything runs (data generation included); resolves the default
    --source. `filtered`: the variants with a filter (v2a, dvdf, igdf); `backbone_errors`: the backbone's own messages."""
    if args.env_id not in SUPPORTED_ENV_IDS:
        fail(f"unknown --env-id {args.env_id!r}; supported: {', '.join(SUPPORTED_ENV_IDS)}")
    args.source = mixtures.resolve_source(args.env_id, args.source)  # the default, or a named mixture's entries
    entries = parse_source(args.source)  # sizes <= 0 before the dataset ids are built, in data_gen.py's words
    if args.target_size < 1:
        fail(f"--target-size {args.target_size}: the target dataset would get no transition; the minimum is 1")
    if args.source_size < 1:
        total = sum(e.weight for e in entries)
        fail(f"--source-size {args.source_size}: must be a positive number of transitions"
             + (f"; the minimum --source-size for this mixture is {mixtures.min_source_size(entries)}"
                if math.isfinite(total) else ""))
    for ds_id, rec in expected_generation(args).items():
        if not 1 <= rec["transitions"] <= MAX_DATASET_TRANSITIONS:
            fail(f"{ds_id} ({rec['domain']}:{rec['quality']}) would get {rec['transitions']:,} transitions; a dataset "
                 f"holds 1 to {MAX_DATASET_TRANSITIONS:,} (data_gen.py's cap): change --source-size, --target-size or "
                 f"the weights")
    stages, bench, runs = variant_stages[args.variant], args.bench > 0, [args.resume, args.reuse_stages]
    budgets = {1: ("repr-steps", args.repr_steps), 3: ("sql-steps", args.sql_steps), 4: ("info-steps", args.info_steps)}
    trained = [k for k in stages if k in budgets and (k != 4 or args.dynamics_score == "contrastive")]  # ot: no steps
    sql_gamma, sql_tau = sql_discount(args)
    checks = [
        (not 0 <= args.seed < 2**31, f"--seed must lie in [0, 2^31), got {args.seed}"),
        (not 0 < args.xi <= 1 or (args.tradeoff is not None and not 0 <= args.tradeoff <= 1),
         f"--xi must lie in (0, 1] and --tradeoff in [0, 1]; got xi {args.xi}, tradeoff {args.tradeoff}"),
        (args.tradeoff is not None and args.variant not in ("v2a", "dvdf"),
         f"--tradeoff applies to the v2a and dvdf variants only, not to {args.variant}"),
        (args.dynamics_score != "contrastive" and args.variant not in filtered,
         f"--dynamics-score applies to the filtered variants v2a, dvdf and igdf only, not to {args.variant}"),
        (args.oracle != "none" and args.variant not in filtered,
         f"--oracle applies to the filtered variants v2a, dvdf and igdf only, not to {args.variant}"),
        (args.oracle != "none" and args.dynamics_score != "contrastive",
         "--oracle replaces the dynamics score h, so --dynamics-score has nothing to do with it: leave it at contrastive"),
        (args.filter_only and args.variant not in filtered,
         f"--filter-only measures a filter: it applies to v2a, dvdf and igdf only, not to {args.variant}"),
        *[(n <= 0 and not bench, f"--{flag} must be > 0 for the {args.variant} variant, got {n}")
          for flag, n in [budgets[k] for k in trained] + [("total-steps", args.total_steps)]],
        *[(n < 0, f"--{flag} must be >= 0, got {n}") for flag, n in budgets.values()],
        *[(n <= 0, f"--{flag.replace('_', '-')} must be > 0, got {n}") for flag, n in [(f, getattr(args, f)) for f in (
            "eval_freq", "eval_episodes", "final_eval_episodes", "log_freq", "batch_size", "z_dim")]],
        (args.threads < 1, f"--threads {args.threads}: must be at least 1"),
        (not 0 < args.learning_rate < math.inf, f"--learning-rate must be finite and > 0, got {args.learning_rate}"),
        (not 0 < args.sql_alpha < math.inf, f"--sql-alpha must be finite and > 0, got {args.sql_alpha}"),
        (not 0 <= args.gamma <= 1 or not 0 < args.tau <= 1,
         f"--gamma must lie in [0, 1] and --tau in (0, 1]; got gamma {args.gamma}, tau {args.tau}"),
        (not 0 <= sql_gamma <= 1 or not 0 < sql_tau <= 1,
         f"--sql-gamma must lie in [0, 1] and --sql-tau in (0, 1]; got {args.sql_gamma}, {args.sql_tau}"),
        *[(True, msg) for msg in backbone_errors],
        (args.bench < 0 or (bench and any(runs)), "--bench takes a number >= 0 and excludes --resume/--reuse-stages"),
        (all(runs), "--resume and --reuse-stages exclude each other"),
        *[(not os.path.isdir(run), f"{run} is not a run directory") for run in filter(None, runs)],
    ]
    for bad, msg in checks:
        if bad:
            fail(msg)
