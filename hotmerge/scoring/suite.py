"""Score a resident model on lm-eval tasks whose requests are built once.

Task resolution, request building, filters, per-document metrics and aggregation
are lm-eval's own (the same calls `lm_eval.evaluator.evaluate` makes), so a score
equals `lm_eval.simple_evaluate` on the same weights. What differs: requests are
built once at start-up and only the model's responses change per candidate.
lm-eval internals (a task's filter names, the per-document memo) are reached through
lm_eval_compat, which checks the installed lm-eval when a TaskSuite is built.
"""

from __future__ import annotations

import logging
import math
import time
from collections import defaultdict
from dataclasses import dataclass, field, replace
from typing import Any

from hotmerge.errors import CandidateError, ConfigError
from hotmerge.scoring import lm_eval_compat
from hotmerge.toy.taskfiles import TASKS_DIR

FEWSHOT_SEED = 1234  # lm_eval.simple_evaluate's default fewshot_random_seed
REQUEST_TYPES = ("loglikelihood", "loglikelihood_rolling", "generate_until")


@dataclass
class TaskScores:
    """One candidate's evaluation."""

    score: float
    results: dict[str, dict[str, float]]  # lm-eval layout: {task: {"acc,none": ...}}
    seconds: dict[str, float] = field(default_factory=dict)
    # standard error of the weighted score (None where a metric has no closed-form one)
    stderr: float | None = None


@dataclass(frozen=True)
class ReportedTask:
    """A task whose metrics are all reported (`hotmerge eval`): `metric` only picks its
    score, and a task without that metric is scored by its first one instead."""

    name: str
    weight: float = 1.0
    metric: str = "acc,none"
    first_metric_fallback: bool = True


def _quiet_lm_eval() -> None:
    for name in ("lm_eval", "lm-eval", "datasets"):
        logging.getLogger(name).setLevel(logging.ERROR)


class TaskSuite:
    """The configured tasks with their requests built, ready to score any weights."""

    def __init__(
        self,
        tasks,
        *,
        include_paths: list[str] = (),
        limit: int | None = None,
        num_fewshot: int | None = None,
        shuffle: bool = False,
        seed: int = 0,
        apply_chat_template: bool = False,
        fewshot_as_multiturn: bool = False,
        lm=None,
    ):
        """`tasks` is a list of objects with name, weight and metric (config.TaskSpec).

        `lm` supplies the chat template; the chat template is applied only when
        asked for and the tokenizer has one.
        """
        lm_eval_compat.check()
        _quiet_lm_eval()
        self.specs = list(tasks)
        names = sorted({spec.name for spec in self.specs})
        manager = task_manager(names, include_paths)
        unknown = [n for n in names if n not in manager.all_tasks]
        if unknown:
            raise ConfigError(
                f"unknown lm-eval task(s) {', '.join(unknown)}: check the names or add the folder "
                "holding their YAML with --task-search-path"
            )
        self.tasks = manager.load(names)["tasks"]

        use_chat = bool(apply_chat_template) and _has_chat_template(lm)
        for name, task in self.tasks.items():
            if num_fewshot is not None and task.get_config("num_fewshot") != 0:
                task.set_config(key="num_fewshot", value=num_fewshot)
            elif task.get_config("num_fewshot") is None:
                task.set_config(key="num_fewshot", value=0)
            task.set_fewshot_seed(seed=FEWSHOT_SEED)
            if shuffle:
                # Shuffled once with the run's seed, so every candidate sees the same documents.
                task.dataset = task.dataset.shuffle(seed=seed)
            task.build_all_requests(
                limit=limit,
                rank=0,
                world_size=1,
                apply_chat_template=use_chat,
                fewshot_as_multiturn=fewshot_as_multiturn and use_chat,
                chat_template=lm.apply_chat_template if use_chat else None,
                tokenizer_name=getattr(lm, "tokenizer_name", "") if use_chat else "",
            )
            if not task.instances:
                raise ConfigError(f"task {name} has no documents in its test split: check its data files")
        self.limit = limit
        # The documents, materialised once: lm-eval re-renders (and recompiles) each
        # doc's target and choices templates inside process_results on every call,
        # which is most of the metric time; those depend on the document only.
        self.docs = {}
        for name, task in self.tasks.items():
            self.docs[name] = list(task.doc_iterator(rank=0, limit=limit, world_size=1))
            for method in ("doc_to_target", "doc_to_choice"):
                lm_eval_compat.memoize_per_document(task, method)
        self.requests: dict[str, list] = defaultdict(list)
        for task in self.tasks.values():
            for instance in task.instances:
                self.requests[instance.request_type].append(instance)
        self.notes: list[str] = []  # one line for each metric replaced, for the command to print
        self.specs = [self._check_metric(spec) for spec in self.specs]

    def _check_metric(self, spec):
        """The spec, or (first_metric_fallback) the spec scored by the task's first metric."""
        task = self.tasks[spec.name]
        metric, _, filter_key = spec.metric.partition(",")
        filters = lm_eval_compat.task_filter_names(task)
        if metric in task.aggregation() and (not filter_key or filter_key in filters):
            return spec
        known = [f"{m},{f}" for m in task.aggregation() for f in filters]
        if getattr(spec, "first_metric_fallback", False):
            self.notes.append(f"task {spec.name} has no metric {spec.metric}: its score is {known[0]}, "
                              "its first metric")
            return replace(spec, metric=known[0])
        raise ConfigError(
            f"task {spec.name} has no metric {spec.metric!r}: use one of {', '.join(known)}"
        )

    @property
    def n_requests(self) -> int:
        return sum(len(reqs) for reqs in self.requests.values())

    def _forward(self, lm, instances) -> None:
        """Run `instances` through `lm` (an lm-eval LM), one call per request type, in
        lm-eval's order; their responses land in instance.resps."""
        lm_eval_compat.quiet_progress_bars(lm)  # hotmerge draws its own progress
        by_type = defaultdict(list)
        for instance in instances:
            instance.resps = []
            instance.filtered_resps = {}
            by_type[instance.request_type].append(instance)
        for request_type in REQUEST_TYPES:
            if not by_type.get(request_type):
                continue
            cloned = [inst for inst in by_type[request_type] for _ in range(inst.repeats)]
            responses = getattr(lm, request_type)(cloned, disable_tqdm=True)
            for response, instance in zip(responses, cloned, strict=True):
                instance.resps.append(response)

    def evaluate(self, lm) -> TaskScores:
        """Run every request through `lm` (an lm-eval LM) and aggregate as lm-eval does."""
        seconds = {}
        started = time.perf_counter()
        self._forward(lm, [inst for reqs in self.requests.values() for inst in reqs])
        seconds["forward"] = time.perf_counter() - started

        started = time.perf_counter()
        results = {name: self._aggregate(task) for name, task in self.tasks.items()}
        score, variance = 0.0, 0.0
        for spec in self.specs:
            value = results[spec.name][spec.metric]
            if not math.isfinite(value):
                raise CandidateError(f"task {spec.name} metric {spec.metric} is {value}")
            score += spec.weight * value
            metric, _, filter_key = spec.metric.partition(",")
            se = results[spec.name].get(f"{metric}_stderr,{filter_key}")
            variance = variance + (spec.weight * se) ** 2 if se is not None and variance is not None else None
        seconds["metrics"] = time.perf_counter() - started
        # Tasks are scored on separate items: their errors add in quadrature.
        stderr = math.sqrt(variance) if variance is not None else None
        return TaskScores(score=score, results=results, seconds=seconds, stderr=stderr)

    @property
    def doc_counts(self) -> dict[str, int]:
        """task -> how many documents it scores."""
        return {name: len(docs) for name, docs in self.docs.items()}

    def check_per_item_means(self) -> None:
        """Racing and subsets need every metric to be lm-eval's plain mean of per-document values."""
        from lm_eval.api import metrics

        for spec in self.specs:
            metric = spec.metric.partition(",")[0]
            aggregation = self.tasks[spec.name].aggregation()[metric]
            if aggregation is not metrics.mean:
                raise ConfigError(
                    f"racing and subsets need metrics that lm-eval averages per document, and task {spec.name} "
                    f"aggregates {metric} with {getattr(aggregation, '__name__', aggregation)}: "
                    "use a mean metric such as acc or exact_match, or turn racing and subsets off")

    def item_values(self, lm, positions: dict[str, list[int]]) -> dict[int, list[float]]:
        """Score the documents at `positions` (task -> indices into its documents) only.

        Returns spec index -> the per-document value of that spec's metric, in the order
        of `positions`, from lm-eval's own filters and process_results."""
        chosen = {name: [self.docs[name][i] for i in pos] for name, pos in positions.items()}
        instances = {}
        for name, docs in chosen.items():
            ids = {doc_id for doc_id, _ in docs}
            instances[name] = [inst for inst in self.tasks[name].instances if inst.doc_id in ids]
        self._forward(lm, [inst for insts in instances.values() for inst in insts])
        per_doc = {}
        for name, docs in chosen.items():
            task = self.tasks[name]
            lm_eval_compat.apply_filters(task, instances[name])
            by_doc = defaultdict(list)
            for instance in sorted(instances[name], key=lambda x: x.idx):
                by_doc[instance.doc_id].append(instance)
            per_doc[name] = {
                filter_key: [task.process_results(doc, [r.filtered_resps[filter_key] for r in by_doc[doc_id]])
                             for doc_id, doc in docs]
                for filter_key in lm_eval_compat.task_filter_names(task)}
        values = {}
        for index, spec in enumerate(self.specs):
            metric, _, filter_key = spec.metric.partition(",")
            values[index] = [float(m[metric]) for m in per_doc[spec.name][filter_key or "none"]]
        return values

    def _aggregate(self, task) -> dict[str, float]:
        task.apply_filters()
        by_doc = defaultdict(list)
        for instance in task.instances:
            by_doc[instance.doc_id].append(instance)
        for instances in by_doc.values():
            instances.sort(key=lambda x: x.idx)
        raw: dict[tuple[str, str], list[Any]] = defaultdict(list)
        for filter_key in task.instances[0].filtered_resps:
            for doc_id, doc in self.docs[task.config.task]:
                requests = by_doc[doc_id]
                metrics = task.process_results(doc, [r.filtered_resps[filter_key] for r in requests])
                for metric, value in metrics.items():
                    raw[(metric, filter_key)].append(value)
        aggregations = task.aggregation()
        out = {}
        for (metric, filter_key), items in raw.items():
            out[f"{metric},{filter_key}"] = float(aggregations[metric](items))
            stderr = closed_form_stderr(aggregations[metric])
            if stderr is not None:  # lm-eval's own key for it; bootstrapped metrics get none
                out[f"{metric}_stderr,{filter_key}"] = float(stderr(items)) if len(items) > 1 else float("nan")
        return out


def task_manager(names, include_paths=()):
    """lm-eval's TaskManager for `names`, indexing lm-eval's bundled tasks only when needed.

    Indexing the ~14,000 task files that ship with lm-eval takes 15-20 s on two cores,
    at every start of every process. When each name is a plain task (not a group or a
    tag) found in the toy task folder or the include paths, the index of those folders
    alone builds the same tasks: lm-eval indexes its bundled tasks first and lets the
    include paths override them, and building a task reads only its own YAML (and the
    files it includes), never the index. Groups and tags can name members anywhere, so
    they, and any name not found locally, get the full index.
    """
    from lm_eval.tasks import TaskManager

    paths = [str(TASKS_DIR), *map(str, include_paths)]
    local = TaskManager(include_path=paths, include_defaults=False)
    if set(names) <= set(local.all_subtasks):  # YAML and Python tasks; no groups, no tags
        return local
    return TaskManager(include_path=paths)


def closed_form_stderr(aggregation):
    """lm-eval's closed-form standard error for an aggregation (mean, acc_all), else None.

    lm-eval bootstraps the others (perplexity, bleu, ...), too slow to run per candidate."""
    from lm_eval.api import metrics

    return {metrics.mean: metrics.mean_stderr, metrics.acc_all: metrics.acc_all_stderr}.get(aggregation)


def _has_chat_template(lm) -> bool:
    tokenizer = getattr(lm, "tokenizer", None)
    return bool(getattr(tokenizer, "chat_template", None))
