"""The evolve config file: mergekit-evolve's YAML schema plus a few hotmerge keys.

The schema mirrors mergekit 0.1.5's `ModelGenomeDefinition` (genome) and
`EvolMergeConfiguration` (top level), so a mergekit-evolve config loads unchanged.
hotmerge adds `task_paths` (lm-eval include paths) and `seed`. Unknown keys are
errors here (mergekit ignores them silently), so a misspelt key is caught.

Every problem becomes a `ConfigError` with a one-line message: `load_config` checks
the file and the schema, `validate_config` checks the model folders (headers only),
all before any weights are loaded.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from hotmerge.config.genome import Genome
from hotmerge.config.tokenizer import VOCAB_SOURCES, TokenizerSection, map_models, settings_of
from hotmerge.errors import ConfigError
from hotmerge.models.folder import ModelInfo, warn_own_code
from hotmerge.models.hub import normalize_reference, resolve_reference
from hotmerge.kernels.methods import METHOD_NAMES, METHODS, SUPPORTED_METHODS, get_method

MERGE_METHODS = SUPPORTED_METHODS
# Every method of the task-arithmetic family works on deltas from a base model.
BASE_METHODS = tuple(m for m in METHOD_NAMES if get_method(m).needs_base)

_STRICT = ConfigDict(extra="forbid", frozen=True)


def _absolute(value: str, base_dir) -> str:
    """Relative paths: against the config file's folder when that exists, else the CWD."""
    if os.path.isabs(value):
        return os.path.normpath(value)
    if base_dir is not None and os.path.exists(os.path.join(base_dir, value)):
        return os.path.normpath(os.path.abspath(os.path.join(base_dir, value)))
    return os.path.normpath(os.path.abspath(value))


def _resolve_path(value: str, info: ValidationInfo) -> str:
    return _absolute(value, (info.context or {}).get("base_dir"))


def _resolve_model(value: str, info: ValidationInfo) -> str:
    return resolve_model_path(value, (info.context or {}).get("base_dir"))


def resolve_model_path(value: str, base_dir=None) -> str:
    """A model reference of a config, normalised (ValueError: why it is not one): a folder
    (made absolute), a hub name (name@revision), or mergekit's `model+adapter` of either.
    validate_config turns hub names into cached folders (models/hub.py)."""
    if not value.strip():
        raise ValueError("is empty: give a model folder or a hub repository name")
    return normalize_reference(value, base_dir)


class GenomeConfig(BaseModel):
    """mergekit.evo.genome.ModelGenomeDefinition, with stricter checks."""

    model_config = _STRICT

    models: list[str]
    merge_method: str
    base_model: Optional[str] = None
    tokenizer_source: Optional[str] = None
    # mergekit's `tokenizer:` section (a merge config key; hotmerge takes it here too)
    tokenizer: Optional[TokenizerSection] = None
    layer_granularity: int = 0
    normalize: Optional[bool] = None
    allow_negative_weights: bool = False
    filters: Optional[list[str]] = None
    smooth: bool = False

    @field_validator("models")
    @classmethod
    def _models(cls, value: list[str], info: ValidationInfo) -> list[str]:
        if not value:
            raise ValueError("is empty: list at least one model folder")
        out = []
        for i, v in enumerate(value):
            try:
                out.append(_resolve_model(v, info))
            except ValueError as e:
                raise ValueError(f"[{i}] {e}") from None
        dup = sorted({p for p in out if out.count(p) > 1})
        if dup:
            raise ValueError(f"lists {dup[0]} twice: list each model once")
        return out

    @field_validator("base_model")
    @classmethod
    def _base_model(cls, value: Optional[str], info: ValidationInfo) -> Optional[str]:
        if value is None:
            return None
        return _resolve_model(value, info)

    @field_validator("tokenizer_source")
    @classmethod
    def _tokenizer_source(cls, value: Optional[str], info: ValidationInfo) -> Optional[str]:
        if value is None or value in VOCAB_SOURCES:
            return value
        return _resolve_model(value, info)

    @field_validator("tokenizer")
    @classmethod
    def _tokenizer(cls, value: Optional[TokenizerSection], info: ValidationInfo) -> Optional[TokenizerSection]:
        if value is None:
            return None
        return map_models(value, lambda ref: _resolve_model(ref, info))

    @field_validator("merge_method")
    @classmethod
    def _merge_method(cls, value: str, info: ValidationInfo) -> str:
        if value in METHODS:
            METHODS[value].refuse_unless_supported()
        if value not in MERGE_METHODS:
            raise ValueError(f"'{value}' is not supported: use one of {', '.join(MERGE_METHODS)}")
        if not METHODS[value].searchable and (info.context or {}).get("search", True):
            raise ValueError(f"{value} has no parameter for evolve to search: score a mergekit merge "
                             "config of it with hotmerge eval MERGE.yaml --tasks ..., write it with hotmerge "
                             "export, or search a method with parameters")
        return value

    @field_validator("layer_granularity")
    @classmethod
    def _granularity(cls, value: int) -> int:
        if value < 0:
            raise ValueError(
                f"is {value}: use a positive divisor of the layer count, or 0 for one group"
            )
        return value

    @field_validator("filters")
    @classmethod
    def _filters(cls, value: Optional[list[str]]) -> Optional[list[str]]:
        for i, f in enumerate(value or []):
            if not f:
                raise ValueError(
                    f"entry {i} is empty: give a substring of tensor names, e.g. self_attn or mlp"
                )
        return value

    @model_validator(mode="after")
    def _method_rules(self) -> "GenomeConfig":
        m = self.merge_method
        if self.tokenizer_source is not None and self.tokenizer is not None:
            raise ValueError("tokenizer_source and tokenizer are both given, which mergekit refuses: keep one")
        if m in BASE_METHODS and self.base_model is None:
            raise ValueError(
                f"merge_method {m} needs base_model: add genome.base_model (the model the "
                "others were fine-tuned from)"
            )
        if m == "slerp":
            if self.smooth:
                raise ValueError("slerp does not support smooth: set genome.smooth: false")
            if self.filters:
                raise ValueError("slerp does not support filters: remove genome.filters")
            if len(self.models) < 2:
                raise ValueError(
                    f"slerp needs at least 2 models, got {len(self.models)}: add models "
                    "to genome.models"
                )
        if self.base_model is not None and self.base_model not in self.models:
            # mergekit-evolve then adds the base as an extra source without parameters;
            # mergekit 0.1.5 rejects that for these two methods when merging.
            if m == "linear":
                raise ValueError(
                    "linear with a base_model that is not in genome.models cannot be "
                    "merged by mergekit (the base would need a weight): add base_model "
                    "to genome.models, or remove base_model"
                )
            if m == "slerp":
                raise ValueError(
                    "slerp with a base_model that is not in genome.models gives 3 "
                    "inputs, and slerp takes 2: remove base_model (each layer group "
                    "picks its own base)"
                )
        return self


class TaskConfig(BaseModel):
    """mergekit.evo.config.TaskConfiguration: a bare string is a task name."""

    model_config = _STRICT

    name: str
    weight: float = 1.0
    metric: str = "acc,none"

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        if isinstance(value, str):
            return {"name": value}
        return value

    @field_validator("name", "metric")
    @classmethod
    def _not_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("is empty: give an lm-eval task name / metric key like acc,none")
        return value

    @field_validator("weight")
    @classmethod
    def _finite(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError(f"is {value}: use a finite number")
        return value


def _between_0_and_1(value: float, use: str) -> float:
    """`value` if strictly between 0 and 1, else the validator's error saying what to use."""
    if not 0 < value < 1:
        raise ValueError(f"is {value}: use {use}")
    return value


class RacingConfig(BaseModel):
    """Racing options (search/racing.py explains the rule)."""

    model_config = _STRICT

    # Cumulative share of the search items scored after each round; the last is 1. Eighths:
    # the test holds at every round at once, so more rounds cost only an apply each.
    schedule: list[float] = [0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0]
    # Chance that any decision of a generation (a candidate stopped as inside or outside
    # the best μ) is wrong.
    delta: float = 0.05
    # The betting test, the only one: a paired z-test was offered and removed, since it
    # stopped one of two exactly tied candidates far more often than δ.
    test: Literal["betting"] = "betting"

    @field_validator("schedule")
    @classmethod
    def _schedule(cls, value: list[float]) -> list[float]:
        if not value or value[-1] != 1.0 or any(not 0 < v <= 1 for v in value) or \
                any(b <= a for a, b in zip(value, value[1:])):
            raise ValueError(f"is {value}: give increasing shares in (0, 1] that end with 1.0, e.g. [0.25, 0.5, 1.0]")
        return value

    @field_validator("test", mode="before")
    @classmethod
    def _test(cls, value):
        if value != "betting":
            raise ValueError(f"is {value!r}: only the betting test holds its δ (the paired z-test was removed); "
                             "drop the key")
        return value

    @field_validator("delta")
    @classmethod
    def _delta(cls, value: float) -> float:
        return _between_0_and_1(value, "a probability between 0 and 1, e.g. 0.05")


class _EstimatedFitness(BaseModel):
    """What the fitness modes that tell CMA-ES estimates share: a candidate's estimate is never
    the best, so CMA-ES's mean is scored (subsets: on `mean_items` of the search items), within
    a share of the documents."""

    model_config = _STRICT

    # In a long run, scoring CMA-ES's mean takes at most this share of the search's documents;
    # the first scorings come sooner (search/coordinator.py, may_score_mean).
    full_share: float = 0.25

    @field_validator("full_share")
    @classmethod
    def _full_share(cls, value: float) -> float:
        return _between_0_and_1(value, "a share of the documents in (0, 1), e.g. 0.25")


class SubsetsConfig(_EstimatedFitness):
    """Fitness on adaptive subsets (search/subsets.py explains the rule). Sizes are shares of
    the search items; the size adapts between `minimum` and `maximum`."""

    # As small as allowed, as UH-CMA-ES starts: the size grows as soon as the ranking is noisy
    # (on the toy's 2,000-item pool, starting at 5% needed 2.3× the documents of 2% to reach
    # full evaluation's held-out score; bench/RESULTS.md).
    start: float = 0.02
    minimum: float = 0.02
    # At most half: a disjoint second subset of the same size measures the ranking's noise.
    # A tenth by default: where the population's true scores differ by less than the noise (a
    # plateau, or a search near its optimum), the measure calls every ranking noisy, and a
    # larger subset buys no better ranking; at a tenth, such a generation still costs 8.9×
    # fewer documents than full evaluation (bench/RESULTS.md: on the toy's 2,000-item pool a
    # fifth spent 1.5× the documents of a fixed 5% to reach the same held-out score).
    maximum: float = 0.1
    # Factor the size grows by after a noisy generation (UH-CMA-ES's alpha; it shrinks by
    # growth ** -0.25 otherwise).
    growth: float = 1.5
    # The share of the search items CMA-ES's mean is scored on, the same items every time (1:
    # in full); best_config.yaml is chosen among the means. They need telling apart from each
    # other only, and at half the items a scoring costs half, so full_share's schedule scores
    # them twice as often (bench/RESULTS.md).
    mean_items: float = 0.5

    @field_validator("start", "minimum", "maximum")
    @classmethod
    def _share(cls, value: float) -> float:
        if not 0 < value <= 0.5:
            raise ValueError(f"is {value}: use a share of the search items in (0, 0.5], e.g. 0.05")
        return value

    @field_validator("growth")
    @classmethod
    def _growth(cls, value: float) -> float:
        if not value > 1:
            raise ValueError(f"is {value}: use a factor above 1, e.g. 1.5")
        return value

    @field_validator("mean_items")
    @classmethod
    def _mean_items(cls, value: float) -> float:
        if not 0 < value <= 1:
            raise ValueError(f"is {value}: use a share of the search items in (0, 1], e.g. 0.5 (1: all of them)")
        return value

    @model_validator(mode="after")
    def _order(self) -> "SubsetsConfig":
        if not self.minimum <= self.start <= self.maximum:
            raise ValueError(f"needs minimum <= start <= maximum, got {self.minimum}, {self.start}, {self.maximum}: "
                             "reorder them")
        return self


class IrtConfig(_EstimatedFitness):
    """IRT anchor fitness (search/irt.py explains the model and the schedule)."""

    anchors: int = 100
    # Generations scored in full at the start, to fit the item model.
    calibration_generations: int = 2
    # Every this many generations, a generation is scored in full and the model refitted.
    recalibrate_every: int = 10

    @field_validator("anchors", "calibration_generations", "recalibrate_every")
    @classmethod
    def _positive(cls, value: int) -> int:
        if value < 1:
            raise ValueError(f"is {value}: use a positive whole number")
        return value


class EvolveConfig(BaseModel):
    """mergekit.evo.config.EvolMergeConfiguration plus hotmerge's task_paths and seed."""

    model_config = _STRICT

    genome: GenomeConfig
    tasks: list[TaskConfig]
    limit: Optional[int] = None
    num_fewshot: Optional[int] = None
    shuffle: bool = False
    random_init: bool = False
    apply_chat_template: bool = True
    fewshot_as_multiturn: bool = True
    # hotmerge additions
    task_paths: list[str] = []
    seed: int = 42
    # Held-out re-scoring: each new best (or the top k of every generation) and CMA-ES's
    # mean at the end are scored on these tasks too; select_by picks best_config.yaml.
    heldout_tasks: list[TaskConfig] = []
    heldout_top_k: Optional[int] = None
    select_by: Literal["search", "heldout"] = "search"
    # Racing (search/racing.py): off by default, so a plain run equals mergekit-evolve's.
    racing: Optional[RacingConfig] = None
    # Fitness on adaptive subsets (search/subsets.py): off by default.
    subsets: Optional[SubsetsConfig] = None
    # IRT anchor fitness (search/irt.py): off by default.
    irt: Optional[IrtConfig] = None
    # What the live model computes in (transformers runtime). Merges are bfloat16 either
    # way; float32 holds the same merged values and computes in float32, about 6x faster
    # than bfloat16 on CPUs without bf16 instructions (AVX2).
    compute_dtype: Literal["bfloat16", "float32"] = "bfloat16"

    @field_validator("tasks")
    @classmethod
    def _tasks(cls, value: list[TaskConfig]) -> list[TaskConfig]:
        if not value:
            raise ValueError("is empty: list at least one lm-eval task")
        return value

    @field_validator("racing", "subsets", "irt", mode="before")
    @classmethod
    def _racing(cls, value: Any) -> Any:
        # `racing: true` takes the documented defaults; `racing: false` is plain evaluation.
        if value is True:
            return {}
        if value is False:
            return None
        return value

    @field_validator("heldout_top_k")
    @classmethod
    def _top_k(cls, value: Optional[int]) -> Optional[int]:
        if value is not None and value <= 0:
            raise ValueError(f"is {value}: use a positive number, or remove it to re-score each new best")
        return value

    @model_validator(mode="after")
    def _heldout_rules(self) -> "EvolveConfig":
        chosen = [name for name in ("racing", "subsets", "irt") if getattr(self, name) is not None]
        if len(chosen) > 1:
            raise ValueError(f"{' and '.join(chosen)} are ways to score fewer items: keep one of them")
        names = [task.name for task in self.tasks]
        if self.irt is not None and len(set(names)) < len(names):
            raise ValueError("irt needs one value per item: name each search task once")
        if self.select_by == "heldout" and not self.heldout_tasks:
            raise ValueError("select_by: heldout needs heldout_tasks: list the held-out tasks, or select_by: search")
        if self.heldout_top_k is not None and not self.heldout_tasks:
            raise ValueError("heldout_top_k needs heldout_tasks: list the held-out tasks, or remove heldout_top_k")
        return self

    @field_validator("limit")
    @classmethod
    def _limit(cls, value: Optional[int]) -> Optional[int]:
        if value is not None and value <= 0:
            raise ValueError(f"is {value}: use a positive number of examples, or remove it")
        return value

    @field_validator("num_fewshot")
    @classmethod
    def _fewshot(cls, value: Optional[int]) -> Optional[int]:
        if value is not None and value < 0:
            raise ValueError(f"is {value}: use 0 or more, or remove it")
        return value

    @field_validator("task_paths")
    @classmethod
    def _task_paths(cls, value: list[str], info: ValidationInfo) -> list[str]:
        return [_resolve_path(v, info) for v in value]


# ---------------------------------------------------------------------------
# The benchmark guard: mergekit-evolve 0.1.5's check_for_naughty_config

# Task-name prefixes of well-known test benchmarks (mergekit.evo.config.NAUGHTY_PREFIXES).
BENCHMARK_PREFIXES = ("mmlu", "hendrycks", "agieval", "gsm8k", "hellaswag", "winogrande", "arc_", "ai2_arc",
                      "truthfulqa", "bigbench", "piqa", "openbookqa", "leaderboard")
ALLOW_BENCHMARKS_FLAG = "--i-understand-the-depths-of-the-evils-i-am-unleashing"


def benchmark_tasks(cfg: "EvolveConfig") -> list[str]:
    """Tasks named after a test benchmark (a `_train` task is a training split: allowed)."""
    return [t.name for t in cfg.tasks
            if t.name.startswith(BENCHMARK_PREFIXES) and not t.name.endswith("_train")]


def check_benchmark_tasks(cfg: "EvolveConfig", allow: bool) -> list[str]:
    """Refuse to search against a benchmark's test set unless the user says they mean it;
    returns the benchmark tasks (for a warning) when allowed."""
    found = benchmark_tasks(cfg)
    if found and not allow:
        raise ConfigError(f"task {found[0]} is a common benchmark: searching against its test set games "
                          f"the benchmark: use another split, or pass {ALLOW_BENCHMARKS_FLAG} if you mean it")
    return found


# ---------------------------------------------------------------------------
# Loading


def load_config(path) -> EvolveConfig:
    """Read and check a config file (schema only; see validate_config for the models)."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist: check the path") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file {path} ({e.strerror}): check the path") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: malformed YAML{_yaml_where(e)}: fix the YAML syntax") from None
    if data is None:
        raise ConfigError(f"{path} is empty: write a genome: and a tasks: section")
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path} is not a YAML mapping: write top-level keys genome: and tasks:"
        )
    return parse_config(data, base_dir=path.resolve().parent, source=str(path))


def parse_config(data: dict, base_dir=None, source: str = "config", search: bool = True) -> EvolveConfig:
    """Validate a config dict; relative paths resolve against base_dir when they exist there.
    search: the genome is searched (False: it describes a merge config's models, and a method
    with nothing to search is fine)."""
    try:
        return EvolveConfig.model_validate(
            data, context={"base_dir": str(base_dir) if base_dir is not None else None, "search": search}
        )
    except ValidationError as e:
        raise ConfigError(f"{source}: {format_validation_error(e)}") from None


def _yaml_where(e: yaml.YAMLError) -> str:
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return where + (f" ({problem})" if problem else "")


# What a field should hold, for the "fix" half of a type error.
_FIELD_HINTS = {
    "genome": "a mapping with models, merge_method, ...",
    "genome.models": "a list of model folder paths",
    "genome.merge_method": "one of " + ", ".join(MERGE_METHODS),
    "genome.base_model": "the path of the base model folder",
    "genome.tokenizer_source": "base, union or a model folder path",
    "genome.tokenizer": "a mapping with source, tokens, pad_to_multiple_of",
    "genome.layer_granularity": "a whole number >= 0 (0 = one group for all layers)",
    "genome.normalize": "true or false (or remove it for the method's default)",
    "genome.allow_negative_weights": "true or false",
    "genome.filters": "a list of tensor-name substrings, e.g. [self_attn, mlp]",
    "genome.smooth": "true or false",
    "tasks": "a list of task names or {name, weight, metric} entries",
    "limit": "a positive whole number, or remove it",
    "num_fewshot": "a whole number >= 0, or remove it",
    "shuffle": "true or false",
    "random_init": "true or false",
    "apply_chat_template": "true or false",
    "fewshot_as_multiturn": "true or false",
    "task_paths": "a list of folders with lm-eval task YAML files",
    "seed": "a whole number",
    "heldout_tasks": "a list of task names or {name, weight, metric} entries",
    "heldout_top_k": "a positive whole number, or remove it",
    "select_by": "search or heldout",
    "racing": "true, false or a mapping with schedule and delta",
    "subsets": "true, false or a mapping with start, minimum, maximum, growth, full_share and mean_items",
    "irt": "true, false or a mapping with anchors, calibration_generations, recalibrate_every and full_share",
    "irt.anchors": "a positive whole number, e.g. 100",
    "irt.calibration_generations": "a positive whole number, e.g. 2",
    "irt.recalibrate_every": "a positive whole number, e.g. 10",
    "compute_dtype": "bfloat16 or float32",
    "racing.schedule": "a list of increasing shares ending with 1.0",
    "racing.delta": "a probability, e.g. 0.05",
    "racing.test": "betting (the only test), or remove it",
    "subsets.start": "a share of the search items in (0, 0.5], e.g. 0.05",
    "subsets.minimum": "a share of the search items in (0, 0.5], e.g. 0.02",
    "subsets.full_share": "a share of the documents in (0, 1), e.g. 0.25",
    "irt.full_share": "a share of the documents in (0, 1), e.g. 0.25",
    "subsets.mean_items": "a share of the search items in (0, 1], e.g. 0.5",
    "subsets.maximum": "a share of the search items in (0, 0.5], e.g. 0.1",
    "subsets.growth": "a factor above 1, e.g. 1.5",
}
_ALLOWED_KEYS = {
    "": list(EvolveConfig.model_fields),
    "genome": list(GenomeConfig.model_fields),
    "genome.tokenizer": list(TokenizerSection.model_fields),
    "task": list(TaskConfig.model_fields),
    "racing": list(RacingConfig.model_fields),
    "subsets": list(SubsetsConfig.model_fields),
    "irt": list(IrtConfig.model_fields),
}


def format_validation_error(e: ValidationError) -> str:
    """One line for a pydantic ValidationError: field path, problem, fix."""
    errors = e.errors()
    err = errors[0]
    loc = [str(p) for p in err["loc"]]
    # tasks.0.name -> tasks[0].name
    field = ""
    for p in loc:
        field += f"[{p}]" if p.isdigit() else (f".{p}" if field else p)
    kind = err["type"]
    msg = err["msg"]
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""

    if kind == "extra_forbidden":
        parent, _, key = field.rpartition(".")
        scope = "task" if parent.startswith(("tasks[", "heldout_tasks[")) else parent
        allowed = ", ".join(_ALLOWED_KEYS.get(scope, []))
        where = f" in {parent}" if parent else ""
        return f"unknown key '{key}'{where}: remove it or fix the spelling (allowed: {allowed}){more}"
    if kind == "missing":
        hint = _hint_for(field)
        return f"{field} is missing: add it{f' ({hint})' if hint else ''}{more}"
    if kind == "value_error":
        # Our own validators: the message already names the problem and the fix.
        text = msg.removeprefix("Value error, ")
        if not field:
            return f"{text}{more}"
        # Field checks read on from the field name ("genome.models is empty: ...").
        sep = "" if text.startswith("[") else " " if text.startswith(("is ", "entry ", "lists ", "'")) else ": "
        return f"{field}{sep}{text}{more}"
    hint = _hint_for(field)
    got = err.get("input")
    got_txt = f" (got {_short(got)})" if not isinstance(got, dict) else ""
    fix = f": use {hint}" if hint else ": fix the value"
    return f"{field or 'config'}: {msg[0].lower() + msg[1:]}{got_txt}{fix}{more}"


def _hint_for(field: str) -> str:
    if field in _FIELD_HINTS:
        return _FIELD_HINTS[field]
    generic = re.sub(r"\[\d+\]", "", field).removeprefix("heldout_")
    if generic.startswith("tasks."):
        return {
            "tasks.name": "an lm-eval task name",
            "tasks.weight": "a finite number",
            "tasks.metric": "a metric key like acc,none",
        }.get(generic, "")
    return _FIELD_HINTS.get(generic, "")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def task_list(text: str, option: str) -> list["TaskConfig"]:
    """A command line's comma-separated task names (`option` names the flag in errors)."""
    tasks = [TaskConfig.model_validate(name.strip()) for name in text.split(",") if name.strip()]
    if not tasks:
        raise ConfigError(f"{option} {text!r} names no task: give comma-separated lm-eval task names")
    return tasks


# ---------------------------------------------------------------------------
# Checks against the model folders (config.json and safetensors headers only)


@dataclass
class ValidatedConfig:
    config: EvolveConfig
    models: list[ModelInfo]  # same order as genome.models
    base: Optional[ModelInfo]  # genome.base_model, or None
    num_layers: int
    # the output vocabulary tokenizer_source (or tokenizer:) asks for (models/vocab.py)
    vocabulary: Optional[Any] = None

    @property
    def genome_config(self) -> GenomeConfig:
        return self.config.genome

    @property
    def reference(self) -> ModelInfo:
        """The model the others are checked against (and whose layout the merge has)."""
        return self.base if self.base is not None else self.models[0]

    @property
    def tokenizer_path(self) -> str:
        """The folder whose tokenizer the merged model uses: the built vocabulary's, or the
        reference's without tokenizer_source."""
        return self.vocabulary.path if self.vocabulary is not None else self.reference.path

    def with_tasks(self, tasks: list["TaskConfig"], **update) -> "ValidatedConfig":
        """This config scoring `tasks` instead (and any other EvolveConfig fields in `update`)."""
        return dataclasses.replace(self, config=self.config.model_copy(update={"tasks": tasks, **update}))

    def genome(self) -> Genome:
        return Genome(self.config.genome, self.num_layers)

    def require_scorable(self) -> None:
        """Refuse in one line, before any weight loads, models the runtimes cannot score."""
        from hotmerge.models.folder import require_causal_lm

        require_causal_lm([*self.models, self.base])


def validate_config(cfg: EvolveConfig, inputs_of=None, tokenizer_base: Optional[str] = None,
                    allow_crimes: bool = False) -> ValidatedConfig:
    """Check that the models exist, match each other, and fit the genome; load no weights
    (with tokenizer_source: build the vocabulary, see models/vocab.py). allow_crimes
    (mergekit's flag) lets architectures differ where every tensor's name and shape match.

    A merge config's slices say what mergekit gathers for a vocabulary tensor,
    inputs_of(tensor name) -> (models, base), and its base_model (tokenizer_base) is the
    base of the vocabulary even where the method takes none."""
    cfg = with_local_models(cfg)
    g = cfg.genome
    infos = {}
    for i, p in enumerate(g.models):
        infos[p] = _model_info(p, f"genome.models[{i}]")
    base = None
    if g.base_model is not None:
        base = infos.get(g.base_model) or _model_info(g.base_model, "genome.base_model")
    models = [infos[p] for p in g.models]

    ref = base if base is not None else models[0]
    ref_label = "base_model" if base is not None else "genome.models[0]"
    ts = g.tokenizer_source if g.tokenizer is None else g.tokenizer.source
    if ts is not None and ts not in VOCAB_SOURCES and not os.path.isdir(ts.partition("+")[0]):
        raise ConfigError(
            f"genome.tokenizer_source {ts} is not base, union or an existing model folder: fix the path"
        )
    settings = settings_of(g.tokenizer_source, g.tokenizer)
    axes = {}
    if settings is not None:
        from hotmerge.models.vocab import vocabulary_axes

        axes = vocabulary_axes(ref)
    for i, info in enumerate(models):
        if info is not ref:
            _check_same_layout(info, f"genome.models[{i}]", ref, ref_label, axes, allow_crimes)

    n = ref.num_layers
    if n < 1:
        raise ConfigError(f"{ref.path} has num_hidden_layers={n}: the models need at least one layer")
    k = g.layer_granularity
    if k > 0 and n % k != 0:
        divisors = [d for d in range(1, n + 1) if n % d == 0]
        raise ConfigError(
            f"genome.layer_granularity={k} does not divide num_hidden_layers={n} of "
            f"{ref.path}: use a divisor of {n} ({', '.join(map(str, divisors))}), or 0 for one group"
        )

    vocabulary = None
    if settings is not None:
        vocabulary, models, base = _align(g, settings, models, base, inputs_of, tokenizer_base or g.base_model)
    for i, p in enumerate(cfg.task_paths):
        if not os.path.exists(p):
            raise ConfigError(f"task_paths[{i}] {p} does not exist: fix the path or remove it")
    return ValidatedConfig(config=cfg, models=models, base=base, num_layers=n, vocabulary=vocabulary)


def with_local_models(cfg: EvolveConfig) -> EvolveConfig:
    """cfg with every model reference a local folder: hub names (name@revision, either half
    of model+adapter) fetched into the Hugging Face cache, or found there offline."""
    g = cfg.genome
    found: dict[str, str] = {}

    def local(ref: str, label: str) -> str:
        if ref not in found:
            try:
                found[ref] = resolve_reference(ref)
            except ConfigError as e:
                raise ConfigError(f"{label}: {e}") from None
        return found[ref]

    models = [local(ref, f"genome.models[{i}]") for i, ref in enumerate(g.models)]
    for i, folder in enumerate(models):
        if folder in models[:i]:
            j = models.index(folder)
            raise ConfigError(f"genome.models[{j}] {g.models[j]} and genome.models[{i}] {g.models[i]} are the same "
                              f"model ({folder}): list each model once")
    update: dict[str, Any] = {"models": models}
    if g.base_model is not None:
        update["base_model"] = local(g.base_model, "genome.base_model")
    if g.tokenizer_source is not None and g.tokenizer_source not in VOCAB_SOURCES:
        update["tokenizer_source"] = local(g.tokenizer_source, "genome.tokenizer_source")
    if g.tokenizer is not None:
        update["tokenizer"] = map_models(g.tokenizer, lambda ref: local(ref, "genome.tokenizer"))
    return cfg.model_copy(update={"genome": g.model_copy(update=update)})


def _align(g: GenomeConfig, settings: dict, models: list, base: Optional[ModelInfo], inputs_of, tokenizer_base):
    """The output vocabulary, and the models as they read in it (models/vocab.py)."""
    from hotmerge.models.vocab import align_models, inputs_of_genome

    infos = {info.reference: info for info in [*models, *([base] if base is not None else [])]}
    if inputs_of is None:
        # slerp merges two models per tensor: the base of each layer group does not change their rows
        genome_inputs = inputs_of_genome(g.models, None if g.merge_method == "slerp" else g.base_model)

        def inputs_of(_name):
            return genome_inputs
    vocabulary, aligned = align_models(settings, infos, tokenizer_base, inputs_of)
    moved = any(info.vocabulary is not None for info in aligned.values())
    if moved and g.merge_method == "slerp" and len(g.models) > 2:
        raise ConfigError("slerp over more than two models whose vocabularies differ: which two a layer group "
                          "merges changes with every candidate, and so would mergekit's rows for tokens some "
                          "models lack: merge two models, or models that share one vocabulary")
    return vocabulary, [aligned[info.reference] for info in models], (aligned[base.reference] if base else None)


def _model_info(path: str, label: str) -> ModelInfo:
    folder, plus, adapter = path.partition("+")
    if plus and not os.path.isdir(adapter):
        raise ConfigError(f"{label}: adapter folder {adapter} does not exist: fix the path after the +")
    if not os.path.isdir(folder):
        raise ConfigError(
            f"{label}: model folder {folder} does not exist: fix the path (relative paths "
            "are looked up beside the config file, then in the current directory)"
        )
    try:
        info = ModelInfo.from_path(path)
    except ConfigError as e:
        raise ConfigError(f"{label}: {e}") from None
    warn_own_code(info)
    return info


def _check_same_layout(info: ModelInfo, label: str, ref: ModelInfo, ref_label: str, vocab_axes: dict,
                       allow_crimes: bool = False) -> None:
    """Same architecture (unless allow_crimes), layers and tensors; a vocabulary tensor
    (vocab_axes: name -> token axis, given with tokenizer_source) may differ along its token axis."""
    fix = "merge only models fine-tuned from the same base"
    who = f"{label} ({info.path})"
    refwho = f"{ref_label} ({ref.path})"
    if info.architectures != ref.architectures and not allow_crimes:
        raise ConfigError(
            f"{who} has architectures {info.architectures} but {refwho} has "
            f"{ref.architectures}: {fix}, or pass --allow-crimes to merge them where every tensor's name and "
            "shape match (the merged model is built as the reference's architecture)"
        )
    if info.num_layers != ref.num_layers:
        raise ConfigError(
            f"{who} has {info.num_layers} layers but {refwho} has {ref.num_layers}: {fix}"
        )
    for name in ref.tensors:
        if name not in info.tensors:
            raise ConfigError(f"{who} lacks tensor {name} that {refwho} has: {fix}")
    for name in info.tensors:
        if name not in ref.tensors:
            raise ConfigError(f"{who} has tensor {name} that {refwho} lacks: {fix}")
    for name, t in ref.tensors.items():
        mine = info.tensors[name].shape
        axis = vocab_axes.get(name)
        if axis is not None and len(mine) == len(t.shape) and all(
                a == b for d, (a, b) in enumerate(zip(mine, t.shape)) if d != axis):
            continue
        if mine != t.shape and not vocab_axes and mine[1:] == t.shape[1:] and _vocabulary_rows(info, mine) \
                and _vocabulary_rows(ref, t.shape):
            raise ConfigError(
                f"{who} has {mine[0]} token rows in {name} but {refwho} has {t.shape[0]}: their vocabularies "
                "differ, which mergekit merges only with tokenizer_source: set tokenizer_source (base, union or a "
                "model folder) to build one vocabulary and move every model's rows into it")
        if mine != t.shape:
            raise ConfigError(
                f"{who} has tensor {name} with shape {list(mine)} but {refwho} has "
                f"{list(t.shape)}: {fix}"
            )


def _vocabulary_rows(info: ModelInfo, shape: tuple) -> bool:
    """Whether a tensor has one row per token of its model (config.json's vocab_size)."""
    size = info.config.get("vocab_size", (info.config.get("text_config") or {}).get("vocab_size"))
    return bool(shape) and shape[0] == size
