# Source mixtures: the `--source` grammar (`domain:quality[@policy_domain][:weight]` entries, or a named mixture), each
# robot's default mixture, and the Minari ids and sizes of a mixture's datasets. One grammar and one set of ids for
# data_gen.py, which makes the datasets, and the training scripts, which find them. docs: docs/data_gen.md ("Default mixtures")
import math
from typing import NamedTuple, Optional

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


class Entry(NamedTuple):
    """One mixture entry: data of `domain` collected by the `quality` behaviour policy of `policy` (the domain whose
    policy file collects it: `domain` itself unless the entry names another with `@`)."""
    domain: str
    quality: str
    weight: float
    policy: str

    @property
    def foreign(self) -> bool:
        """Collected by another domain's policy: its dataset id, generation record and episodes say so."""
        return self.policy != self.domain


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


def malformed(item: str, why: str) -> DataGenError:
    return DataGenError(f"malformed source entry {item!r}: {why}")


def grammar_error(item: str) -> DataGenError:
    return malformed(item, f"expected domain:quality[@policy_domain][:weight] with quality in {'|'.join(QUALITIES)}, "
                           f"e.g. 'gravity-0.5:random,torso-hard:medium,friction-0.5:expert@nominal', or a named "
                           f"mixture: {named_sources_hint()}")


def parse_quality(item: str, domain: str, field: str) -> tuple[str, str]:
    """`quality[@policy_domain]` -> (quality, policy domain); without `@` the policy is the entry's own domain's."""
    quality, at, policy = field.partition("@")
    if quality not in QUALITIES or (at and not policy):
        raise grammar_error(item)
    if at and quality == "random":  # uniform actions: no policy file, so no domain to take it from
        raise malformed(item, f"a random policy has no domain: drop '@{policy}' (random data are uniform actions)")
    return quality, policy or domain


def parse_source(spec: str) -> list[Entry]:
    """`domain:quality[@policy_domain][:weight]` entries -> [Entry(domain, quality, weight, policy)]; a weight is a
    finite number > 0. Whether the domains exist is checked where the robot is known (data_gen.validate_args)."""
    entries = []
    for item in filter(None, (x.strip() for x in spec.split(","))):
        parts = item.split(":")
        if len(parts) not in (2, 3):
            raise grammar_error(item)
        quality, policy = parse_quality(item, parts[0], parts[1])
        try:
            weight = float(parts[2]) if len(parts) == 3 else 1.0
        except ValueError:
            weight = math.nan
        if not (math.isfinite(weight) and weight > 0):
            raise malformed(item, "the weight must be a finite number > 0")
        entries.append(Entry(parts[0], quality, weight, policy))
    if not entries:
        raise DataGenError("empty source spec: give at least one domain:quality entry")
    return entries


def size_tag(n: int) -> str:
    return f"{n // 1000}k" if n % 1000 == 0 else str(n)  # exact: 333333 -> "333333", 30000 -> "30k"


def id_slug(domain: str) -> str:
    return domain.replace(".", "p").replace("-", "")  # Minari rejects dots in names: gravity-0.5 -> gravity0p5


def dataset_ids(env_id: str, source: str, source_size: int, target_size: int) -> tuple[list[str], str]:
    """`<domain>-<quality>-<size>-v0` per entry; an entry collected by another domain's policy inserts `-by-<policy>`
    after the quality, so its data never share an id with the domain's own (and ids without `@` stay as they were)."""
    entries = parse_source(source)
    ns = f"v2a/{env_id.lower()}"
    by = lambda e: f"-by-{id_slug(e.policy)}" if e.foreign else ""
    src = [f"{ns}/source/{id_slug(e.domain)}-{e.quality}{by(e)}-{size_tag(n)}-v0"
           for e, n in zip(entries, entry_sizes(entries, source_size))]
    return src, f"{ns}/target/medium-{size_tag(target_size)}-v0"


def policy_fields(entry: Entry) -> dict:
    """What a generation record and each episode's options add for an entry collected by another domain's policy;
    nothing otherwise, so that the records and datasets of entries without `@` stay byte-identical."""
    return {"policy_domain": entry.policy} if entry.foreign else {}


TARGET = Entry("nominal", "medium", 1.0, "nominal")  # the target dataset, as an entry: the nominal medium policy's data


def generation_record(env_id: str, entry: Entry, n: int, mixture: Optional[str], seed: Optional[int]) -> dict:
    """What makes a dataset, stored in it as `v2a_generation` by data_gen.py: re-running with the same values reuses it.
    An entry collected by another domain's policy adds `policy_domain`; without `@` the record is byte for byte what it
    always was, so the datasets made before are reused and the checkpoints keyed on their records stay valid. seed
    None: the record as the training scripts check it (the data seed is no flag of theirs: recorded, not compared)."""
    record = {"env_id": env_id, "domain": entry.domain, "quality": entry.quality, "transitions": n, "seed": seed,
              "mixture": mixture if entry.domain != "nominal" else None, **policy_fields(entry)}
    return record if seed is not None else {k: v for k, v in record.items() if k != "seed"}


MAX_DATASET_TRANSITIONS = 10_000_000  # per dataset


def entry_label(domain: str, quality: str, weight: float = 1.0, policy: Optional[str] = None) -> str:
    """The entry as --source writes it (`@policy` only for another domain's policy, `:weight` only when not 1)."""
    at = f"@{policy}" if policy not in (None, domain) else ""
    return f"{domain}:{quality}{at}" + ("" if weight == 1.0 else f":{weight:g}")


def entry_sizes(entries, source_size: int) -> list[int]:
    total = sum(e[2] for e in entries)
    return [int(source_size * e[2] / total) for e in entries]  # the split that dataset_ids names


def min_source_size(entries) -> int:
    """The smallest --source-size that gives every entry at least one transition."""
    total = sum(e[2] for e in entries)
    need = max(max(1, math.ceil(total / e[2])) for e in entries)
    while need > 1 and min(entry_sizes(entries, need - 1)) >= 1:  # float rounding, either way
        need -= 1
    while min(entry_sizes(entries, need)) < 1:
        need += 1
    return need
