"""Every use of lm-eval beyond its public API, in one place, checked at start-up.

hotmerge uses lm-eval's public API: `lm_eval.simple_evaluate`, `lm_eval.tasks.TaskManager`
(include_path, include_defaults, all_tasks, all_subtasks, load), the Task methods that
`lm_eval.evaluator.evaluate` calls (set_config/get_config, set_fewshot_seed,
build_all_requests, doc_iterator, instances, apply_filters, process_results,
aggregation), the Instance fields, `lm_eval.models.huggingface.HFLM` and
`lm_eval.api.model.TemplateLM`. Everything else it reaches is an internal of the
lm-eval versions in SUPPORTED, reached only through these functions:

    task_filter_names(task)           Task._filters
    apply_filters(task, instances)    Task._filters (Task.apply_filters on some instances only)
    memoize_per_document(task, name)  relies on process_results calling self.doc_to_target/doc_to_choice
    token_scoring_lm()                TemplateLM's private hook _loglikelihood_tokens (fed by _encode_pair)
    quiet_progress_bars(lm)           an LM's _loglikelihood_tokens, replaced on the instance
    add_special_kwargs(...)           lm_eval.models.utils._add_special_kwargs
    has_bos_prefix(...)               lm_eval.models.utils.has_bos_prefix
    resolve_max_length(...)           lm_eval.models.utils.resolve_max_length
    handle_stop_sequences(...)        lm_eval.models.utils.handle_stop_sequences
    normalize_gen_kwargs(...)         lm_eval.models.utils.normalize_gen_kwargs
    postprocess_generated_text(...)   lm_eval.models.utils.postprocess_generated_text
    rolling_token_windows(...)        lm_eval.utils.get_rolling_token_windows, make_disjoint_window

The lm_eval.models.utils helpers are HFLM's own; hotmerge's vLLM adapter (VLLMLM) calls
them so it tokenises, truncates and stops exactly as HFLM does.

`check()` runs `check_version()` (distribution metadata: the installed lm-eval must be
in SUPPORTED, the version pyproject.toml pins) and `check_attributes()` (every internal
above exists); TaskSuite and VLLMRuntime call it at construction. Every failure is one
SetupError line naming the installed version, the supported range, what is missing
and the fix.
"""

from __future__ import annotations

import abc
import functools
import importlib
import importlib.metadata
from typing import Optional

from hotmerge.compat import check_reached, version_in_range
from hotmerge.errors import SetupError

# The lm-eval versions whose internals this module was checked against (pyproject.toml pins it).
SUPPORTED = "==0.4.13"
DISTRIBUTION = "lm-eval"
PINNED = "lm-eval==0.4.13"

# (module, dotted attribute, why), checked by check_attributes.
REACHED = (
    ("lm_eval.models.utils", "_add_special_kwargs", "HFLM's choice of special tokens"),
    ("lm_eval.models.utils", "has_bos_prefix", "HFLM's test for a BOS already in the text"),
    ("lm_eval.models.utils", "resolve_max_length", "HFLM's context length"),
    ("lm_eval.models.utils", "handle_stop_sequences", "HFLM's stop sequences"),
    ("lm_eval.models.utils", "normalize_gen_kwargs", "HFLM's generation arguments"),
    ("lm_eval.models.utils", "postprocess_generated_text", "HFLM's cut at the stop sequences"),
    ("lm_eval.utils", "get_rolling_token_windows", "rolling loglikelihood windows"),
    ("lm_eval.utils", "make_disjoint_window", "rolling loglikelihood windows"),
    ("lm_eval.api.model", "TemplateLM._loglikelihood_tokens", "the token-level scoring hook"),
    ("lm_eval.api.model", "TemplateLM._encode_pair", "TemplateLM.loglikelihood's tokenisation"),
    ("lm_eval.api.task", "ConfigurableTask.doc_to_target", "memoised per document"),
    ("lm_eval.api.task", "ConfigurableTask.doc_to_choice", "memoised per document"),
)


# -- version and attribute checks ----------------------------------------------------------


def installed_version() -> Optional[str]:
    """The installed lm-eval's version, read from its metadata; None when absent."""
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return None


FIX = f"install the version hotmerge is tested with (pip install '{PINNED}')"


def check_version() -> str:
    """The installed lm-eval as 'lm-eval version'; SetupError when it is not in SUPPORTED."""
    version = installed_version()
    if version is None:
        raise SetupError(f"lm-eval is not installed (hotmerge supports lm-eval {SUPPORTED}): {FIX}")
    if not version_in_range(version, SUPPORTED):
        raise SetupError(
            f"lm-eval {version} is installed, but hotmerge reaches lm-eval internals checked only for "
            f"lm-eval {SUPPORTED} (hotmerge/scoring/lm_eval_compat.py): {FIX}")
    return f"lm-eval {version}"


def _missing(label: str, why: str) -> SetupError:
    version = installed_version()
    installed = "lm-eval" if version is None else f"lm-eval {version}"
    return SetupError(f"{installed} has no {label}, which hotmerge reaches ({why}; supported: lm-eval "
                      f"{SUPPORTED}): {FIX}")


def check_attributes() -> None:
    """Every internal in REACHED exists."""
    check_reached(REACHED, _missing)


def check() -> str:
    """check_version and check_attributes; returns the installed lm-eval ('lm-eval 0.4.13')."""
    installed = check_version()
    check_attributes()
    return installed


# -- tasks ------------------------------------------------------------------------------------


def task_filter_names(task) -> list[str]:
    """The names of a task's filter pipelines (the part after the comma of a metric key)."""
    # Task._filters (private): the task's filter ensembles; lm-eval's metric keys are 'metric,filter'.
    filters = getattr(task, "_filters", None)
    return [f.name for f in filters] if filters else ["none"]


def apply_filters(task, instances) -> None:
    """Task.apply_filters on `instances` only (racing scores a subset of the documents)."""
    if not instances:
        return  # a racing round may hold none of a task's documents; lm-eval's ensembles need one
    for ensemble in getattr(task, "_filters", None) or ():
        ensemble.apply(instances)


def memoize_per_document(task, method: str) -> None:
    """Cache task.<method>(doc) per document object (only the one-argument form)."""
    # Task.process_results calls self.doc_to_target / self.doc_to_choice (internal behaviour):
    # an instance attribute of the same name replaces them there.
    original = getattr(task, method)
    cache: dict[int, tuple] = {}

    def cached(doc, *args, **kwargs):
        if args or kwargs:
            return original(doc, *args, **kwargs)
        hit = cache.get(id(doc))
        if hit is None or hit[0] is not doc:
            hit = cache[id(doc)] = (doc, original(doc))
        return hit[1]

    setattr(task, method, cached)


# -- language models ----------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def token_scoring_lm():
    """lm-eval's TemplateLM with its private scoring hook forwarded to `score_tokens`.

    TemplateLM.loglikelihood tokenises each (context, continuation) with its private
    _encode_pair and hands the ((context, continuation), context tokens, continuation
    tokens) triples to its private abstract hook _loglikelihood_tokens. A subclass of
    this class implements score_tokens(requests) -> [(logprob, is_greedy)] instead.
    """
    from lm_eval.api.model import TemplateLM

    class TokenScoringLM(TemplateLM):
        @abc.abstractmethod
        def score_tokens(self, requests) -> list[tuple[float, bool]]:
            """(logprob, is_greedy) of each continuation, given token triples."""

        # TemplateLM._loglikelihood_tokens (private hook): where loglikelihood sends its tokens.
        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
            return self.score_tokens(requests)

    return TokenScoringLM


PROGRESS_METHODS = ("loglikelihood", "loglikelihood_rolling", "generate_until", "_loglikelihood_tokens")


def quiet_progress_bars(lm) -> None:
    """Turn off every progress bar of an lm-eval LM instance, whatever its callers ask for.

    lm-eval's evaluator calls loglikelihood and generate_until without disable_tqdm, and
    HFLM.loglikelihood_rolling scores its windows through _loglikelihood_tokens with
    disable_tqdm=False even when told True: each method is wrapped on the instance to pass
    disable_tqdm=True (lm-eval passes it by keyword). Calling it again changes nothing.
    """
    for name in PROGRESS_METHODS:
        # _loglikelihood_tokens (TemplateLM's private hook): an instance attribute replaces it too.
        method = getattr(lm, name, None)
        if method is None or getattr(method, "quiet", False):
            continue

        def quiet(*args, _method=method, **kwargs):
            return _method(*args, **{**kwargs, "disable_tqdm": True})

        quiet.quiet = True
        setattr(lm, name, quiet)


def add_special_kwargs(add_special_tokens: Optional[bool], add_bos: Optional[bool]) -> dict:
    # lm_eval.models.utils._add_special_kwargs (private): HFLM's tokenizer kwargs for special tokens.
    from lm_eval.models.utils import _add_special_kwargs

    return _add_special_kwargs(add_special_tokens, add_bos)


def has_bos_prefix(sequence: str, bos) -> bool:
    # lm_eval.models.utils.has_bos_prefix (HFLM's helper): the text already starts with BOS.
    from lm_eval.models.utils import has_bos_prefix as impl

    return impl(sequence, bos)


def resolve_max_length(config, tokenizer) -> int:
    # lm_eval.models.utils.resolve_max_length (HFLM's helper): HFLM's max_length for a model.
    from lm_eval.models.utils import resolve_max_length as impl

    return impl(config, tokenizer)


def handle_stop_sequences(until, eos: str) -> list[str]:
    # lm_eval.models.utils.handle_stop_sequences (HFLM's helper): `until` plus EOS, as HFLM stops.
    from lm_eval.models.utils import handle_stop_sequences as impl

    return impl(until, eos=eos)


def normalize_gen_kwargs(gen_kwargs: dict, max_gen_toks: int) -> dict:
    # lm_eval.models.utils.normalize_gen_kwargs (HFLM's helper): defaults and aliases of gen_kwargs.
    from lm_eval.models.utils import normalize_gen_kwargs as impl

    return impl(gen_kwargs, max_gen_toks)


def postprocess_generated_text(generation: str, stop, think_end_token) -> str:
    # lm_eval.models.utils.postprocess_generated_text (HFLM's helper): cut at the first stop string.
    from lm_eval.models.utils import postprocess_generated_text as impl

    return impl(generation, stop, think_end_token)


def rolling_token_windows(tokens: list[int], prefix_token: int, max_seq_len: int) -> list[tuple]:
    """(context, continuation) token windows of a rolling loglikelihood, as lm-eval's LMs build them."""
    # lm_eval.utils.get_rolling_token_windows / make_disjoint_window (lm-eval's helpers for LMs).
    from lm_eval import utils

    return [
        utils.make_disjoint_window(w)
        for w in utils.get_rolling_token_windows(
            token_list=tokens, prefix_token=prefix_token, max_seq_len=max_seq_len, context_len=1)
    ]
