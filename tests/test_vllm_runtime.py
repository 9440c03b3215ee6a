"""The vLLM runtime against the transformers runtime on the toy family.

One vLLM engine per module (module-scoped fixture): an engine start costs 15-40 s on
two CPU cores. Every test applies its own candidates, so the order does not matter.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

pytest.importorskip("vllm")
pytest.importorskip("lm_eval")

from hotmerge.engine.config import TaskConfig, parse_config, validate_config  # noqa: E402
from hotmerge.kernels import NonFiniteMergeError  # noqa: E402

SEED = 7
METHODS = ("task_arithmetic", "ties", "dare_ties", "slerp")
# bf16 kernels differ between vLLM and transformers (fused qkv GEMM, attention, RMSNorm
# order of operations); on the toy model the prompt logprobs agree to 0.012-0.061.
LOGPROB_TOL = 0.1


def _validated(family, method: str):
    genome = {
        "models": [str(p) for p in family.experts],
        "merge_method": method,
        "layer_granularity": 2,
    }
    if method != "slerp":
        genome["base_model"] = str(family.base)
    cfg = parse_config({
        "genome": genome,
        "tasks": ["toy_sum_mc_search"],
        "apply_chat_template": False,
        "fewshot_as_multiturn": False,
        "seed": SEED,
    })
    return validate_config(cfg)


def _candidate(validated, seed: int):
    genome = validated.genome()
    rng = np.random.default_rng(seed)
    x = rng.uniform(0.2, 0.9, size=genome.size)
    return genome.decode(x)


@pytest.fixture(scope="module")
def family(toy_family):
    return toy_family


@pytest.fixture(scope="module")
def runtime(family):
    from hotmerge.engine.runtime.vllm import VLLMRuntime

    rt = VLLMRuntime(_validated(family, "dare_ties"), seed=SEED)
    yield rt
    rt.close()


_HF: dict = {}


def _hf(family, method: str):
    """A transformers runtime per method (cheap: a 0.8M-parameter model), kept per module."""
    from hotmerge.engine.runtime.hf import HFRuntime

    key = (str(family.root), method)
    if key not in _HF:
        _HF[key] = HFRuntime(_validated(family, method), device="cpu", seed=SEED)
    return _HF[key]


def _probe_prompts(tokenizer) -> list[list[int]]:
    texts = ["3 plus 4 is 7", "capital of babazan is fentasmu", "color of apkinta is green"]
    return [tokenizer.encode(t) for t in texts]


def _vllm_logprobs(rt, prompts) -> list[np.ndarray]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
    outs = rt.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    return [np.array([o.prompt_logprobs[i][p[i]].logprob for i in range(1, len(p))])
            for p, o in zip(prompts, outs)]


@torch.no_grad()
def _hf_logprobs(hf, prompts) -> list[np.ndarray]:
    out = []
    for p in prompts:
        logits = hf.model(torch.tensor([p])).logits[0].float()
        lp = torch.log_softmax(logits, dim=-1)
        out.append(np.array([float(lp[i - 1, p[i]]) for i in range(1, len(p))]))
    return out


# ---------------------------------------------------------------------------


def test_layout_and_start_up_proof(runtime, family):
    layout = runtime.layout
    assert not layout["unmapped"]
    where = {p["name"]: p for p in layout["placements"]}
    assert set(where) == set(runtime.source_names)
    # q, k, v land as consecutive row blocks of the fused qkv_proj; gate/up in gate_up_proj
    q, k, v = (where[f"model.layers.1.self_attn.{x}_proj.weight"] for x in "qkv")
    assert q["param"] == k["param"] == v["param"] == "model.layers.1.self_attn.qkv_proj.weight"
    assert q["box"][0][1] == k["box"][0][0] and k["box"][0][1] == v["box"][0][0]
    gate, up = (where[f"model.layers.2.mlp.{x}_proj.weight"] for x in ("gate", "up"))
    assert gate["param"] == up["param"] == "model.layers.2.mlp.gate_up_proj.weight"
    assert all(p["full"] for p in layout["placements"])
    proof = runtime.write_proof
    assert proof["groups"]
    # every write was seen, directly or after re-packing the CPU GEMM weights
    assert not proof["ignored_before_repack"] or proof["repack"]


@pytest.mark.parametrize("method", METHODS)
def test_merge_equals_transformers(runtime, family, method):
    validated = _validated(family, method)
    recipe = _candidate(validated, seed=11)
    hf = _hf(family, method)
    hf.apply(recipe)
    runtime.apply(recipe)
    assert runtime.last_apply["table_bytes"] < 4096

    # every merged tensor, fetched back unfused, equals the transformers merge bit for bit
    live = runtime.fetch(runtime.source_names)
    state = hf.model.state_dict()
    for name in runtime.source_names:
        assert torch.equal(live[name], state[name]), name

    prompts = _probe_prompts(runtime.lm.tokenizer)
    for got, want in zip(_vllm_logprobs(runtime, prompts), _hf_logprobs(hf, prompts)):
        assert np.max(np.abs(got - want)) < LOGPROB_TOL


def _responses(suite):
    return [[inst.resps for inst in task.instances] for task in suite.tasks.values()]


@pytest.fixture(scope="module")
def suite(runtime):
    from hotmerge.engine.scoring import TaskSuite

    return TaskSuite(
        [TaskConfig(name="toy_sum_mc_search"), TaskConfig(name="toy_capital_mc_search"),
         TaskConfig(name="toy_sum_gen_search", metric="exact_match,none")],
        lm=runtime.lm,
    )


def test_task_scores_equal_transformers(runtime, family, suite):
    validated = _validated(family, "dare_ties")
    recipe = _candidate(validated, seed=3)
    hf = _hf(family, "dare_ties")
    hf.apply(recipe)
    runtime.apply(recipe)

    ours = suite.evaluate(runtime.lm)
    ours_resps = _responses(suite)
    theirs = suite.evaluate(hf.lm)
    theirs_resps = _responses(suite)
    # bf16 near-ties may flip one document between the two engines' kernels (seen: vLLM's
    # bf16 logits tie '14' and '16' after "7 plus 7 is" at -1.2875, transformers has
    # -1.311 / -1.280), so a score may differ by one document, never more.
    for (name, task), a_task, b_task in zip(suite.tasks.items(), ours_resps, theirs_resps):
        n_docs = len({inst.doc_id for inst in task.instances})
        for metric, value in ours.results[name].items():
            assert abs(value - theirs.results[name][metric]) <= 1 / n_docs + 1e-9, (name, metric)
        same = 0
        for a, b in zip(a_task, b_task):
            if isinstance(a[0], tuple):  # (loglikelihood, is_greedy)
                assert abs(a[0][0] - b[0][0]) < LOGPROB_TOL
                same += 1
            else:  # generated text
                same += a == b
        assert same >= 0.95 * len(a_task), name


def test_loglikelihood_rolling_matches_hflm(runtime, family):
    from lm_eval.api.instance import Instance

    recipe = _candidate(_validated(family, "task_arithmetic"), seed=5)
    hf = _hf(family, "task_arithmetic")
    hf.apply(recipe)
    runtime.apply(recipe)
    texts = ["3 plus 4 is 7", "capital of babazan is fentasmu \n color of apkinta is green"]
    requests = [Instance(request_type="loglikelihood_rolling", doc={}, arguments=(t,), idx=0)
                for t in texts]
    ours = runtime.lm.loglikelihood_rolling(requests)
    theirs = hf.lm.loglikelihood_rolling(requests, disable_tqdm=True)
    # HFLM sums the token logprobs in bf16 (spacing 0.5 at -84), hence the relative bound
    assert np.allclose(ours, theirs, rtol=1e-2, atol=LOGPROB_TOL)
    # a document longer than the context is scored in several windows
    long = " ".join(["1 plus 1 is 2"] * 40)
    (score,) = runtime.lm.loglikelihood_rolling(
        [Instance(request_type="loglikelihood_rolling", doc={}, arguments=(long,), idx=0)])
    assert math.isfinite(score) and score < 0


def test_apply_a_b_a_gives_a_exactly(runtime, family, suite):
    validated = _validated(family, "dare_ties")
    a, b = _candidate(validated, seed=21), _candidate(validated, seed=22)
    runtime.apply(a)
    first = suite.evaluate(runtime.lm)
    first_resps = _responses(suite)
    runtime.apply(b)
    suite.evaluate(runtime.lm)
    assert _responses(suite) != first_resps  # B really is a different model
    runtime.apply(a)
    again = suite.evaluate(runtime.lm)
    assert again.results == first.results
    assert _responses(suite) == first_resps  # every loglikelihood, bit for bit


def test_non_finite_candidate_raises_and_runtime_stays_usable(runtime, family, suite):
    validated = _validated(family, "dare_ties")
    genome = validated.genome()
    good = _candidate(validated, seed=31)
    runtime.apply(good)
    before = suite.evaluate(runtime.lm)
    before_resps = _responses(suite)
    tensors_before = runtime.fetch(["model.layers.0.self_attn.q_proj.weight", "lm_head.weight"])

    x = np.full(genome.size, 1e39)  # weights overflow bf16: inf * delta
    with pytest.raises(NonFiniteMergeError):
        runtime.apply(genome.decode(x))
    after = runtime.fetch(list(tensors_before))
    for name, t in tensors_before.items():
        assert torch.equal(after[name], t), f"{name} changed by a refused candidate"
    assert suite.evaluate(runtime.lm).results == before.results
    assert _responses(suite) == before_resps

    runtime.apply(_candidate(validated, seed=32))  # the next candidate applies normally
    assert math.isfinite(suite.evaluate(runtime.lm).score)
