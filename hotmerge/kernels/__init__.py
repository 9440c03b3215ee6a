"""Merge kernels, by concern:

  methods.py        the method registry (every fact about a merge method, once)
  reference.py      the per-tensor torch oracle, equal to mergekit (the definition)
  stats.py          load-time statistics (|delta| histograms, norms, della rank codes)
  stats_cache.py    those statistics kept on disk between runs (keyed by sources and code)
  layout.py         FlatSources: the resident sources, base and segment table
  table.py          build_table: one candidate's CoefficientTable
  finite.py         the finite-output check (NonFiniteMergeError)
  dispatch.py       apply: one candidate into the live weights, on the device's backend
  torch_backend.py  the chunked torch path (any device; the other backends match its bits)
  cpu_backend.py    the CPU fast path and the C kernel (cpu_native.py, cpu_merge.c)
  streaming.py      sources in (pinned) host memory, streamed to the merge in chunks
  triton_merge.py   the Triton kernels (CUDA), imported lazily so that
                    `import hotmerge.kernels` never needs a GPU or sets up Triton
"""

import importlib

# Names served from the submodules on first use, so that `hotmerge.kernels.methods` (the
# registry, read by config validation) does not import torch.
_EXPORTS = {
    "apply": "dispatch",
    "NonFiniteMergeError": "finite",
    "FlatSources": "layout",
    "Segment": "layout",
    "tensor_key_of": "layout",
    "METHODS": "methods",
    "get_method": "methods",
    "merge_tensor": "reference",
    "UndefinedMergeError": "reference",
    "slerp_tensor": "reference",
    "SourceStats": "stats",
    "compute_stats": "stats",
    "CoefficientTable": "table",
    "build_table": "table",
    "slerp_from_genes": "table",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        if name in ("dispatch", "finite", "layout", "reference", "stats", "stats_cache", "table", "torch_backend",
                    "cpu_backend", "cpu_native", "methods", "streaming", "triton_merge"):
            return importlib.import_module(f"{__name__}.{name}")
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value
