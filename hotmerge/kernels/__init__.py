"""Merge kernels: the torch oracle (reference), load-time statistics (stats), the
candidate-application engine (fused) and its Triton kernels (triton_merge, imported
lazily so that `import hotmerge.kernels` never needs a GPU or sets up Triton)."""

from .fused import (
    CoefficientTable,
    FlatSources,
    NonFiniteMergeError,
    Segment,
    apply,
    build_table,
    slerp_from_genes,
    tensor_key_of,
)
from .reference import METHODS, merge_tensor, slerp_tensor
from .stats import SourceStats, compute_stats

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
    "merge_tensor",
    "slerp_from_genes",
    "slerp_tensor",
    "tensor_key_of",
]
