"""Merge kernels, by concern:

  methods.py        the method registry (every fact about a merge method, once)
  reference.py      the per-tensor torch oracle, equal to mergekit (the definition)
  stats.py          load-time statistics (|delta| histograms, norms, della rank codes)
  layout.py         FlatSources: the resident sources, base and segment table
  table.py          build_table: one candidate's CoefficientTable
  finite.py         the finite-output check (NonFiniteMergeError)
  dispatch.py       apply: one candidate into the live weights, on the device's backend
  torch_backend.py  the chunked torch path (the engine's definition, any device)
  cpu_backend.py    the CPU fast path and the C kernel (cpu_native.py, cpu_merge.c)
  triton_merge.py   the Triton kernels (CUDA), imported lazily so that
                    `import hotmerge.kernels` never needs a GPU or sets up Triton
"""

from .dispatch import apply
from .finite import NonFiniteMergeError
from .layout import FlatSources, Segment, tensor_key_of
from .methods import METHODS, get_method
from .reference import merge_tensor, slerp_tensor
from .stats import SourceStats, compute_stats
from .table import CoefficientTable, build_table, slerp_from_genes

__all__ = [
    "CoefficientTable",
    "FlatSources",
    "METHODS",
    "NonFiniteMergeError",
    "Segment",
    "SourceStats",
    "apply",
    "build_table",
    "compute_stats",
    "get_method",
    "merge_tensor",
    "slerp_from_genes",
    "slerp_tensor",
    "tensor_key_of",
]
