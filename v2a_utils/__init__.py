# What the four scripts (v2a_iql.py, v2a_td3bc.py, data_gen.py, benchmark.py) share, one module per concern, none of
# which imports a script (the README's tables). The training scripts call it as `utils.<name>`; SCRIPT_NAMES says which
# module holds each such name, so that a reader of a script finds it.
import importlib

SCRIPT_NAMES = {  # module -> the names that v2a_iql.py and v2a_td3bc.py call as utils.<name>
    "errors": ("fail",),
    "shifts": ("SUPPORTED_ENV_IDS",),
    "flags": ("cli", "validate_args", "sql_discount"),
    "data": ("load_data", "stage5_data", "data_level", "normalized_observation", "split"),
    "runs": ("check_resume", "stage_keys", "exit_in_one_line"),
    "training": ("Run", "start_run", "Learner", "train_policy", "finish_filter_only", "has_source_rows", "value_tags",
                 "batch_value_means"),
    "update": ("optimize", "compiled", "params", "grad_and_value", "adam_step_", "init_adam_state", "cosine_lr",
               "gru_last_state"),
    "diagnostics": ("domain_probe", "z_diagnostics", "score_diagnostics"),
    "timing": ("bench_stage",),
}


def __getattr__(name: str):
    """utils.<name> (PEP 562): the modules of SCRIPT_NAMES are imported at the first such look-up, not with the package,
    because they import torch, and data_gen.py imports this package (v2a_utils.shifts) where it must load the shifted
    envs without torch. Every name is bound at once, before anything is compiled: a training script's own imports
    look one up."""
    if not any(name in names for names in SCRIPT_NAMES.values()):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    for module, names in SCRIPT_NAMES.items():
        held = importlib.import_module(f"{__name__}.{module}")
        globals().update((n, getattr(held, n)) for n in names)
    return globals()[name]
