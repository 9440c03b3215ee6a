"""vLLM at tensor-parallel size 2, end to end on the toy family: vLLM's CPU build runs two
workers (each bound to cores of its own), each merges its shards with the whole-tensor
statistics computed across their group, and the live model, assembled from both ranks,
equals the transformers runtime's merge bit for bit; its task scores are within bf16's
bound of the exact ones. One method per kind of whole-tensor statistic: magnitude
histograms (ties), masked L1 norms per candidate (dare_ties), row ranks of partial rows
(della), dot products (slerp), summed variance histograms (sce) and summed counts
(ramplus_tl). The gathered statistics (karcher, arcee_fusion) and every method's shard
arithmetic are proven in tests/test_tensor_parallel.py."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from test_vllm_runtime import (SEED, SUITE_TASKS, U_BF16, Float32Reference, _candidate, _hf, _validated,
                               assert_scores_within)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed"),
    pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2 and not torch.cuda.is_available(),
                       reason="two vLLM CPU workers need two cores"),
    pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.device_count() < 2,
                       reason="tensor-parallel size 2 needs two GPUs"),
]

METHODS = ("ties", "dare_ties", "della", "slerp", "sce", "ramplus_tl")


@pytest.fixture(scope="module")
def runtime(toy_family):
    from hotmerge.runtimes.vllm import VLLMRuntime

    rt = VLLMRuntime(_validated(toy_family, "dare_ties"), seed=SEED, tensor_parallel_size=2)
    yield rt
    rt.close()


def test_both_ranks_hold_shards(runtime):
    """The engine really is split: the worker's layout on each rank holds blocks of tensors."""
    name = "model.layers.0.mlp.down_proj.weight"  # a row-parallel layer: split by columns
    ranks = runtime.llm.collective_rpc("hotmerge_fetch", args=([name],))
    assert len(ranks) == 2
    boxes = [tuple(map(tuple, box)) for rank in ranks for box, _ in rank[name]["blocks"]]
    shape = ranks[0][name]["shape"]
    assert len(set(boxes)) == 2 and all(box != tuple((0, s) for s in shape) for box in boxes)


@pytest.mark.parametrize("method", METHODS)
def test_sharded_merge_equals_transformers(runtime, toy_family, method):
    validated = _validated(toy_family, method)
    for seed in (11, 12):  # a second candidate: the load-time statistics are not stale
        recipe = _candidate(validated, seed=seed)
        hf = _hf(toy_family, method)
        hf.apply(recipe)
        runtime.apply(recipe)
        live = runtime.fetch(runtime.source_names)
        state = hf.model.state_dict()
        for name in runtime.source_names:
            assert torch.equal(live[name], state[name]), (method, seed, name)


def test_task_scores_equal_transformers(runtime, toy_family):
    from hotmerge.scoring.suite import TaskSuite

    recipe = _candidate(_validated(toy_family, "dare_ties"), seed=3)
    hf = _hf(toy_family, "dare_ties")
    hf.apply(recipe)
    runtime.apply(recipe)
    suite = TaskSuite(SUITE_TASKS, lm=runtime.lm)
    assert_scores_within(suite, Float32Reference(hf), U_BF16, {"vllm": runtime.lm}, min_same_generations=0.95)
