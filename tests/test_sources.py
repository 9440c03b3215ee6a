"""Sources in host memory streamed to the merge in chunks (`--sources pinned`): the same
bits as the resident merge, for every method the kernels apply, with chunks that end
inside tensors."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hotmerge import kernels as F
from hotmerge.kernels import cpu_backend, streaming
from hotmerge.kernels.methods import METHODS

REPO = Path(__file__).resolve().parents[1]
SHAPES = [(24, 40), (40,), (7, 9), (1,), (0,), (33, 5), (2, 33)]
M = 3
TASK_METHODS = sorted(m for m, spec in METHODS.items() if spec.engine in ("combine", "task"))
# mergekit's functional methods: (method, params, with a base)
FUNCTIONAL = [
    ("model_stock", {}, True),
    ("nuslerp", {"weight": [0.3, 0.8, 0.0], "active": [1, 1, 0]}, True),
    ("multislerp", {"weight": [0.3, 0.8, 0.5]}, True),
    ("karcher", {}, False),
    ("passthrough", {"scale": [0.0, 0.7, 0.0], "active": [0, 1, 0]}, False),
    ("nearswap", {"t": [0.0, 0.03, 0.0], "active": [0, 1, 0]}, True),
    ("model_stock", {"filter_wise": 1.0}, True),
    ("nuslerp", {"weight": [0.3, 0.8, 0.0], "active": [1, 1, 0], "nuslerp_flatten": 0.0,
                 "nuslerp_row_wise": 1.0}, True),
]


def layout(seed=0, dtype=torch.bfloat16, with_base=True):
    g = torch.Generator().manual_seed(seed)
    base = [torch.randn(s, generator=g).to(dtype) for s in SHAPES]
    models = [[(b.float() + 0.05 * torch.randn(b.shape, generator=g)).to(dtype) for b in base]
              for _ in range(M)]
    flat = F.FlatSources.from_tensors(models, base if with_base else None,
                                      names=[f"layer.{j}.weight" for j in range(len(SHAPES))])
    for j, s in enumerate(flat.segments):
        s.param_row = j % 2
    return flat


def streamed_copy(flat, chunk, base_on_device=False):
    """The same sources as a host-held layout that streams in chunks of `chunk` elements
    (base_on_device: the base kept on the device, only the sources streamed)."""
    host = F.FlatSources(flat.models.clone(), flat.segments, None if flat.base is None else flat.base.clone(),
                         flat.model_keys)
    return host.stream_to("cpu", chunk, base_on_device=base_on_device)


def candidate(method, seed=0):
    rng = np.random.default_rng(seed)
    if method == "slerp":
        return {"t": rng.uniform(0, 1, 2), "pair": np.array([[0, 2], [1, 0]])}
    return {"weight": rng.uniform(0.1, 1.0, (2, M)), "density": rng.uniform(0.3, 0.7, (2, M)),
            "gamma": rng.uniform(0.0, 0.1, (2, M)), "epsilon": np.full((2, M), 0.1)}


def both(flat, host, method, params, backend="auto", **kw):
    """(resident, streamed) outputs of one candidate, flat and per segment."""
    outs = []
    for layout_ in (flat, host):
        table = F.build_table(method, layout_, params, **kw)
        out = torch.full((flat.total,), 7.0, dtype=flat.dtype)
        F.apply(layout_, table, out, backend=backend)
        views = [torch.full((s.numel,), 5.0, dtype=flat.dtype) for s in flat.segments]
        F.apply(layout_, table, views, backend=backend)
        outs.append((out, torch.cat(views)))
    return outs


@pytest.mark.parametrize("chunk", [32, 208, 4096])
@pytest.mark.parametrize("method", TASK_METHODS)
def test_streamed_equals_resident(method, chunk):
    """Chunks of 32 end inside every tensor of more than 32 elements; 4096 holds all."""
    flat = layout(seed=3)
    host = streamed_copy(flat, chunk)
    (a, av), (b, bv) = both(flat, host, method, candidate(method, 1), normalize=True, lambda_=0.9, seed=4)
    assert torch.equal(a, b) and torch.equal(av, bv), (method, int((a != b).sum()))


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare_ties", "della", "sce", "arcee_fusion"])
def test_streamed_with_the_base_on_the_device_equals_resident(method):
    """Pinned with the base kept on the device: only the sources are staged (no staging
    buffer for the base), and the merge is bit-equal to the resident one."""
    flat = layout(seed=11)
    host = streamed_copy(flat, 48, base_on_device=True)
    params = candidate(method, 3) if method in TASK_METHODS else {
        "sce": {"select_topk": 0.5}, "arcee_fusion": {"active": [0, 1, 0]}}[method]
    (a, av), (b, bv) = both(flat, host, method, params, normalize=True, seed=2)
    assert torch.equal(a, b) and torch.equal(av, bv), (method, int((a != b).sum()))
    assert all(base is None for base in streaming.staging(host, "cpu").base)


@pytest.mark.parametrize("case", FUNCTIONAL, ids=lambda c: c[0])
def test_streamed_functional_methods(case):
    method, params, with_base = case
    flat = layout(seed=5, with_base=with_base)
    host = streamed_copy(flat, 48)
    (a, av), (b, bv) = both(flat, host, method, params, normalize=False)
    assert torch.equal(a, b) and torch.equal(av, bv), method


@pytest.mark.parametrize("path", ["torch_chunks", "cpu_fast"])
@pytest.mark.parametrize("method", ["dare_ties", "della", "ties", "breadcrumbs_ties"])
def test_streamed_equals_resident_on_each_cpu_path(monkeypatch, method, path):
    if path == "torch_chunks":
        monkeypatch.setattr(cpu_backend, "fast_ok", lambda flat: False)
    flat = layout(seed=7, dtype=torch.float16)
    host = streamed_copy(flat, 64)
    (a, av), (b, bv) = both(flat, host, method, candidate(method, 2), normalize=True, seed=1)
    assert torch.equal(a, b) and torch.equal(av, bv)


def test_statistics_are_the_whole_tensors():
    """A chunk sees its tensors' load-time statistics, computed once over the whole tensor:
    the cut of a 960-element tensor streamed in 32-element chunks keeps mergekit's k."""
    flat = layout(seed=9)
    host = streamed_copy(flat, 32)
    table = F.build_table("ties", host, {"weight": [1.0, 0.0, 0.0], "density": 0.25}, normalize=False)
    stats = host.stats
    out = torch.zeros(host.total, dtype=host.dtype)
    F.apply(host, table, out)
    s = host.segments[0]
    delta = (host.models[0, s.offset:s.offset + s.numel].float() - host.base[s.offset:s.offset + s.numel].float())
    kept = (out[s.offset:s.offset + s.numel] != host.base[s.offset:s.offset + s.numel]) & (delta.bfloat16() != 0)
    assert abs(int(kept.sum()) - int(0.25 * s.numel)) <= 0.1 * s.numel
    F.apply(host, table, out)
    assert host.stats is stats  # nothing recomputed per apply or per chunk


def test_streamed_nonfinite_raises_untouched():
    flat = layout(seed=11)
    flat.models[0, flat.segments[5].offset + 3] = float("inf")
    host = streamed_copy(flat, 32)
    table = F.build_table("dare_linear", host, candidate("dare_linear"), normalize=True)
    out = torch.full((host.total,), 3.0, dtype=host.dtype)
    with pytest.raises(F.NonFiniteMergeError) as err:
        F.apply(host, table, out)
    assert err.value.segments == [5]
    assert bool((out == 3.0).all())


def test_streamed_output_is_checked():
    host = streamed_copy(layout(), 32)
    table = F.build_table("linear", host, {"weight": [1, 1, 1]}, normalize=True)
    with pytest.raises(ValueError, match="one output tensor per segment"):
        F.apply(host, table, [torch.zeros(1, dtype=host.dtype)])


def _triton_streamed_checks():
    """Triton (in the CPU interpreter) through the streamed path: the resident torch bits."""
    for method in ("ties", "dare_ties", "della_linear", "slerp"):
        flat = layout(seed=13)
        host = streamed_copy(flat, 64)
        (a, _), (b, _) = both(flat, flat, method, candidate(method, 3), backend="torch", normalize=True, seed=2)
        table = F.build_table(method, host, candidate(method, 3), normalize=True, seed=2)
        got = torch.full((host.total,), 7.0, dtype=host.dtype)  # as both() fills the padding
        F.apply(host, table, got, backend="triton", block=32)
        assert torch.equal(got, a), (method, int((got != a).sum()))


@pytest.mark.slow  # the Triton interpreter in a subprocess
def test_triton_interpreter_streamed_equals_resident():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO))
    code = ("import runpy; ns = runpy.run_path('tests/test_sources.py', run_name='sources_triton');"
            "ns['_triton_streamed_checks'](); print('TRITON-OK')")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=600)
    assert "TRITON-OK" in res.stdout, res.stdout[-3000:] + res.stderr[-3000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_pinned_cuda_equals_resident_cuda():
    """Pinned host sources streamed on a second CUDA stream: the resident CUDA bits."""
    flat = layout(seed=17)
    pinned = F.FlatSources(flat.models.pin_memory(), flat.segments, flat.base.pin_memory(), flat.model_keys)
    pinned.stream_to("cuda", 64)
    with_base = F.FlatSources(flat.models.pin_memory(), flat.segments, flat.base.pin_memory(), flat.model_keys)
    with_base.stream_to("cuda", 64, base_on_device=True)  # only the sources cross the host link
    gpu = F.FlatSources(flat.models.cuda(), flat.segments, flat.base.cuda(), flat.model_keys)
    for method in TASK_METHODS:
        params = candidate(method, 5)
        want = torch.zeros(flat.total, dtype=flat.dtype, device="cuda")
        F.apply(gpu, F.build_table(method, gpu, params, normalize=True, seed=3), want)
        for streamed in (pinned, with_base):
            got = torch.zeros_like(want)
            F.apply(streamed, F.build_table(method, streamed, params, normalize=True, seed=3), got)
            torch.cuda.synchronize()
            assert torch.equal(got, want), method
