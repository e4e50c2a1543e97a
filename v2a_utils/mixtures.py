# Source mixtures: the `--source` grammar (`domain:quality[:weight]` entries, or a named mixture), each robot's default
# mixture, and the Minari ids and sizes of a mixture's datasets. One grammar and one set of ids for data_gen.py, which
# makes the datasets, and the training scripts, which find them. docs: docs/data_gen.md ("Default mixtures")
import math
from typing import Optional

from v2a_utils.errors import DataGenError
from v2a_utils.shifts import robot_of

# The default source mixture of each robot: three shift families, each collected by a different behaviour quality
# (docs/data_gen.md, "Default mixtures"); the training scripts' default too.
DEFAULT_SOURCES = {
    "Hopper": "torso-hard:random,gravity-0.5:expert,legjnt-hard:medium",
    "Walker2d": "torso-hard:random,gravity-0.5:expert,thighjnt-hard:medium",
    "HalfCheetah": "torso-hard:random,gravity-2.0:expert,thighjnt-hard:medium",
    "Ant": "gravity-0.1:random,alllegs-hard:expert,hipjnt-medium:medium",
}


# Named mixtures (`--source crossed`; docs/data_gen.md, "Named mixtures"), resolved to their entries before anything
# else, so a name and its entries name the same datasets. `crossed` crosses domain and behaviour quality, which the
# defaults confound (one quality per domain): each of two domains with the same two qualities, whose returns differ
# between the domains (value misassignment). Only committed policies, so it needs no training.
NAMED_SOURCES = {
    "Hopper": {"crossed": "gravity-0.5:medium,gravity-0.5:expert,legjnt-hard:medium,legjnt-hard:expert"},
}
QUALITIES = ("random", "medium", "expert")


def default_source(env_id: str) -> str:
    """The default `--source` mixture of the robot of `env_id`."""
    return DEFAULT_SOURCES[robot_of(env_id)]


def resolve_source(env_id: str, source: Optional[str]) -> Optional[str]:
    """What `--source` stands for: the robot's default for None, a named mixture's entries for its name, anything else
    unchanged (parse_source then checks it, with one-line errors). Never raises: the training scripts call it too."""
    robot = env_id.rpartition("-")[0]
    if source is None:
        return DEFAULT_SOURCES.get(robot)
    return NAMED_SOURCES.get(robot, {}).get(source.strip(), source)


def named_sources_hint() -> str:
    return ", ".join(f"{name} ({robot})" for robot, names in NAMED_SOURCES.items() for name in names)


def parse_source(spec: str) -> list[tuple[str, str, float]]:
    """`domain:quality[:weight]` entries -> [(domain, quality, weight)]; a weight is a finite number > 0."""
    entries = []
    for item in filter(None, (x.strip() for x in spec.split(","))):
        parts = item.split(":")
        if len(parts) not in (2, 3) or parts[1] not in QUALITIES:
            raise DataGenError(f"malformed source entry {item!r}: expected domain:quality[:weight] with quality "
                               f"in {'|'.join(QUALITIES)}, e.g. 'gravity-0.5:random,torso-hard:medium', or a named "
                               f"mixture: {named_sources_hint()}")
        try:
            weight = float(parts[2]) if len(parts) == 3 else 1.0
        except ValueError:
            weight = math.nan
        if not (math.isfinite(weight) and weight > 0):
            raise DataGenError(f"malformed source entry {item!r}: the weight must be a finite number > 0")
        entries.append((parts[0], parts[1], weight))
    if not entries:
        raise DataGenError("empty source spec: give at least one domain:quality entry")
    return entries


def size_tag(n: int) -> str:
    return f"{n // 1000}k" if n % 1000 == 0 else str(n)  # exact: 333333 -> "333333", 30000 -> "30k"


def dataset_ids(env_id: str, source: str, source_size: int, target_size: int) -> tuple[list[str], str]:
    entries = parse_source(source)
    total = sum(w for _, _, w in entries)
    ns = f"v2a/{env_id.lower()}"
    src = [f"{ns}/source/{d.replace('.', 'p').replace('-', '')}-{q}-{size_tag(int(source_size * w / total))}-v0"
           for d, q, w in entries]
    return src, f"{ns}/target/medium-{size_tag(target_size)}-v0"


MAX_DATASET_TRANSITIONS = 10_000_000  # per dataset


def entry_label(domain: str, quality: str, weight: float) -> str:
    return f"{domain}:{quality}" + ("" if weight == 1.0 else f":{weight:g}")


def entry_sizes(entries, source_size: int) -> list[int]:
    total = sum(w for _, _, w in entries)
    return [int(source_size * w / total) for _, _, w in entries]  # exactly as dataset_ids splits the mixture


def min_source_size(entries) -> int:
    """The smallest --source-size that gives every entry at least one transition."""
    total = sum(w for _, _, w in entries)
    need = max(max(1, math.ceil(total / w)) for _, _, w in entries)
    while need > 1 and min(entry_sizes(entries, need - 1)) >= 1:  # float rounding, either way
        need -= 1
    while min(entry_sizes(entries, need)) < 1:
        need += 1
    return need
