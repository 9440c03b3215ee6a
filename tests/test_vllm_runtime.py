"""The vLLM runtime against the transformers runtime on the toy family.

Two engines are compared where their numerics are defined:
- float32 on both sides (vLLM's adapter over a float32 engine, HFLM over a float32
  transformers model, the same merged weights): every loglikelihood within a tight
  float32 bound, every generation and every metric equal;
- the runtimes as they run (bf16): the merged weights bit for bit, and every score within
  a bound derived from bf16's precision (see `tolerance`), each engine against the exact
  (float32) value of the same weights. Two engines' bf16 kernels round differently, and
  differently again on each processor (AMX, AVX512-BF16, AVX2), so a fixed absolute
  tolerance fitted on one machine fails on another.

One bf16 vLLM engine per module (an engine start costs 15-40 s on two CPU cores, more
when the machine is busy); every test applies its own candidates, so the order does not
matter. The float32 test starts one more engine: the runtime loads in bf16 only.
"""

from __future__ import annotations

import copy
import importlib.util
import math
from collections import defaultdict

import numpy as np
import pytest
import torch

from hotmerge.config.evolve import TaskConfig, parse_config, validate_config
from hotmerge.kernels import NonFiniteMergeError

# find_spec, not importorskip: importing vLLM takes 10 s, which collection would pay even when
# the slow tests are left out.
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed"),
]

SEED = 7
METHODS = ("task_arithmetic", "ties", "dare_ties", "slerp")
SUITE_TASKS = (
    TaskConfig(name="toy_sum_mc_search"),
    TaskConfig(name="toy_capital_mc_search"),
    TaskConfig(name="toy_sum_gen_search", metric="exact_match,none"),
)
# The float32 comparison covers the third request type too (rolling windows).
FLOAT32_TASKS = (*SUITE_TASKS, TaskConfig(name="toy_capital_ppl_search", metric="word_perplexity,none"))

# -- how far an engine's loglikelihood may be from the exact value -----------------------------
#
# u is the unit roundoff of the arithmetic: rounding a value moves it by at most u times its
# magnitude. A token's logprob is lp = z_y - logsumexp(z): the difference of two quantities of
# the logits' magnitude, Z (the largest |logit| the model produces on the requests; about 14 on
# the toy model), each carrying the rounding of the logits: at most 2 u Z per token. HFLM also
# rounds each token's logprob to the model's dtype (u |lp|) and sums a continuation's n logprobs
# in it (n - 1 roundings of partial sums no larger than |ll|): at most n u |ll| in all. For a
# continuation of n tokens with loglikelihood ll:
#
#     tolerance = u n (2 Z + |ll|)          for one engine against the exact value
#
# bf16: u = 2^-8 (8 significant bits); the GEMMs accumulate in float32, which adds far less.
# Measured on an AVX2 machine: each engine within half of this bound. The vLLM-transformers gap
# that broke a fixed 0.1 tolerance on an AVX512-BF16 machine (-10.21 against -10.31, one token)
# is about a third of the two engines' bounds added (2 x 2^-8 (2 x 14 + 10.3) = 0.30).
# float32: the rounding of a result is negligible beside the accumulation of a dot product
# of k terms, which may be off by k 2^-24 relative (the classical bound); k = 256, the
# longest dot product of the toy model (intermediate_size), gives u = 2^-16: a bound 256
# times tighter than bf16's, and still more than 100 times what the two engines differ by here.
U_BF16 = 2.0 ** -8
U_FLOAT32 = 256 * 2.0 ** -24


def tolerance(u: float, ll: float, n_tokens: int, z: float) -> float:
    return u * n_tokens * (2 * z + abs(ll))


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
    from hotmerge.runtimes.vllm import VLLMRuntime

    rt = VLLMRuntime(_validated(family, "dare_ties"), seed=SEED)
    yield rt
    rt.close()


_HF: dict = {}


def _hf(family, method: str):
    """A transformers runtime per method (cheap: a 0.8M-parameter model), kept per module."""
    from hotmerge.runtimes.hf import HFRuntime

    key = (str(family.root), method)
    if key not in _HF:
        _HF[key] = HFRuntime(_validated(family, method), device="cpu", seed=SEED)
    return _HF[key]


class Float32Reference:
    """The transformers model on the weights `hf` holds now, in float32 (an exact upcast of
    the bf16 merge): the exact value every engine is held to. `z` is the largest |logit| it
    has produced so far."""

    def __init__(self, hf):
        from lm_eval.models.huggingface import HFLM

        self.model = copy.deepcopy(hf.model).float().eval()
        self.z = 0.0
        self.model.get_output_embeddings().register_forward_hook(self._record)
        self.lm = HFLM(pretrained=self.model, tokenizer=hf.tokenizer, batch_size=64, device="cpu")

    def _record(self, module, inputs, output):
        self.z = max(self.z, float(output.detach().abs().max()))

    @torch.no_grad()
    def logprobs(self, prompts) -> list[np.ndarray]:
        return _token_logprobs(self.model, prompts)

    def n_tokens(self, instance) -> int:
        """How many tokens of the request are scored."""
        if instance.request_type == "loglikelihood":
            return len(self.lm._encode_pair(*instance.arguments)[1])
        return len(self.lm.tok_encode(instance.arguments[0]))  # rolling: every token of the text


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
def _token_logprobs(model, prompts) -> list[np.ndarray]:
    out = []
    for p in prompts:
        logits = model(torch.tensor([p])).logits[0].float()
        lp = torch.log_softmax(logits, dim=-1)
        out.append(np.array([float(lp[i - 1, p[i]]) for i in range(1, len(p))]))
    return out


def _responses(suite):
    return [[inst.resps for inst in task.instances] for task in suite.tasks.values()]


def _scored(suite, lm):
    """lm's metrics and, per task, its response to every request."""
    scores = suite.evaluate(lm)
    return scores.results, {name: [inst.resps[0] for inst in task.instances]
                            for name, task in suite.tasks.items()}


def _undecided_docs(task, reference: list, bounds: list) -> set:
    """Multiple-choice documents whose answer engines within `bounds` of `reference` may pick
    differently: the best choice does not beat another by more than both bounds added."""
    choices = defaultdict(list)
    for i, instance in enumerate(task.instances):
        choices[instance.doc_id].append(i)
    undecided = set()
    for doc_id, rows in choices.items():
        best = max(rows, key=lambda i: reference[i][0])
        if any(reference[best][0] - reference[i][0] <= bounds[best] + bounds[i] for i in rows if i != best):
            undecided.add(doc_id)
    return undecided


def _picks(task, responses: list) -> dict:
    choices = defaultdict(list)
    for i, instance in enumerate(task.instances):
        choices[instance.doc_id].append(i)
    return {doc: max(rows, key=lambda i: responses[i][0]) for doc, rows in choices.items()}


def assert_scores_within(suite, reference: Float32Reference, u: float, engines: dict, *,
                         min_same_generations: float):
    """Each engine's metrics and responses against the exact (reference) ones, to bound u.

    Loglikelihoods: within `tolerance`. Multiple choice: every document whose answer is
    decided at that precision gets the reference's answer from every engine, so a metric
    differs by at most the undecided documents. Generations: a share at least
    min_same_generations equal to the reference's, and a metric differs by at most the
    documents whose generation differs. Perplexities: by what the loglikelihood bounds allow.
    Returns the reference's metrics and each engine's.
    """
    ref_results, ref_resps = _scored(suite, reference.lm)
    got = {name: _scored(suite, lm) for name, lm in engines.items()}
    for name, task in suite.tasks.items():
        n_docs = len({inst.doc_id for inst in task.instances})
        kind = task.instances[0].request_type
        if kind == "generate_until":
            for engine, (results, resps) in got.items():
                differ = {inst.doc_id for inst, a, b in zip(task.instances, resps[name], ref_resps[name]) if a != b}
                assert len(differ) <= (1 - min_same_generations) * n_docs, (engine, name, len(differ))
                for metric, value in results[name].items():
                    assert abs(value - ref_results[name][metric]) <= len(differ) / n_docs + 1e-12, \
                        (engine, name, metric)
            continue
        ref = [r if isinstance(r, tuple) else (r,) for r in ref_resps[name]]
        bounds = [tolerance(u, r[0], reference.n_tokens(inst), reference.z)
                  for r, inst in zip(ref, task.instances)]
        for engine, (results, resps) in got.items():
            for i, (response, want) in enumerate(zip(resps[name], ref)):
                value = response[0] if isinstance(response, tuple) else response
                assert abs(value - want[0]) <= bounds[i], (engine, name, i, value, want[0], bounds[i])
        if kind == "loglikelihood":
            undecided = _undecided_docs(task, ref, bounds)
            want = _picks(task, ref)
            for engine, (results, resps) in got.items():
                picks = _picks(task, resps[name])
                assert all(picks[d] == want[d] for d in want if d not in undecided), (engine, name)
                for metric, value in results[name].items():
                    assert abs(value - ref_results[name][metric]) <= len(undecided) / n_docs + 1e-12, \
                        (engine, name, metric, len(undecided))
        else:  # rolling: -sum(ll) over at least one word and one byte per document
            spread = sum(bounds) / n_docs
            for engine, (results, resps) in got.items():
                for metric, value in results[name].items():
                    want = ref_results[name][metric]
                    if metric.startswith(("word_perplexity", "byte_perplexity")):  # exp(-sum ll / count)
                        assert abs(math.log(value) - math.log(want)) <= spread, (engine, name, metric)
                    else:  # bits_per_byte: -sum ll / (bytes ln 2)
                        assert metric.startswith("bits_per_byte"), metric
                        assert abs(value - want) <= spread / math.log(2), (engine, name, metric)
    return ref_results, {engine: results for engine, (results, _) in got.items()}


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

    # and both bf16 engines compute the same model: every prompt logprob within bf16's bound
    # of the exact value
    reference = Float32Reference(hf)
    prompts = _probe_prompts(runtime.lm.tokenizer)
    exact = reference.logprobs(prompts)
    for engine, got in (("vllm", _vllm_logprobs(runtime, prompts)), ("transformers", _token_logprobs(hf.model, prompts))):
        for values, want in zip(got, exact):
            bound = np.array([tolerance(U_BF16, lp, 1, reference.z) for lp in want])
            assert (np.abs(values - want) <= bound).all(), (engine, values - want, bound)


@pytest.fixture(scope="module")
def suite(runtime):
    from hotmerge.scoring.suite import TaskSuite

    return TaskSuite(SUITE_TASKS, lm=runtime.lm)


@pytest.fixture(scope="module")
def float32_engines(runtime, family, tmp_path_factory):
    """vLLM (hotmerge's lm-eval adapter over a float32 engine) and transformers (HFLM, float32)
    on one dare_ties merge: the runtime's own engine loads in bf16 only, so the float32 vLLM
    engine is started here on the merged weights, written out by the transformers runtime."""
    from vllm import LLM

    from hotmerge.runtimes.vllm import VLLMLM

    validated = _validated(family, "dare_ties")
    recipe = _candidate(validated, seed=3)
    hf = _hf(family, "dare_ties")
    hf.apply(recipe)
    folder = tmp_path_factory.mktemp("merged")
    hf.model.save_pretrained(folder)
    hf.tokenizer.save_pretrained(folder)
    reference = Float32Reference(hf)
    llm = LLM(model=str(folder), dtype="float32", seed=SEED, enforce_eager=True,
              kv_cache_memory_bytes=2 * runtime.kv_cache_bytes, max_num_seqs=runtime.lm.batch_size or 256)
    try:
        yield reference, VLLMLM(llm, hf.tokenizer, max_length=runtime.lm.max_length, seed=SEED)
    finally:
        llm.llm_engine.engine_core.shutdown()


def test_task_scores_equal_transformers_in_float32(float32_engines):
    """The adapter (tokenisation, request batching, rolling windows, greedy decoding, metric
    aggregation) gives HFLM's scores to float32 precision, for every request type."""
    from hotmerge.scoring.suite import TaskSuite

    reference, vllm_lm = float32_engines
    suite = TaskSuite(FLOAT32_TASKS, lm=vllm_lm)
    assert {inst.request_type for task in suite.tasks.values() for inst in task.instances} == {
        "loglikelihood", "loglikelihood_rolling", "generate_until"}
    theirs, ours = assert_scores_within(suite, reference, U_FLOAT32, {"vllm": vllm_lm},
                                        min_same_generations=1.0)
    # at this precision no multiple-choice answer is in doubt: the accuracies are equal
    for task in ("toy_sum_mc_search", "toy_capital_mc_search", "toy_sum_gen_search"):
        assert ours["vllm"][task] == theirs[task], task


def test_task_scores_equal_transformers(runtime, family, suite):
    """The runtimes as they run, bf16: both within bf16's bound of the exact scores."""
    validated = _validated(family, "dare_ties")
    recipe = _candidate(validated, seed=3)
    hf = _hf(family, "dare_ties")
    hf.apply(recipe)
    runtime.apply(recipe)
    # bf16 near-ties may flip a greedy generation between the two engines' kernels (seen: vLLM's
    # bf16 logits tie '14' and '16' after "7 plus 7 is" at -1.2875, transformers has
    # -1.311 / -1.280): at least 95% are equal to the exact model's.
    assert_scores_within(suite, Float32Reference(hf), U_BF16, {"vllm": runtime.lm, "transformers": hf.lm},
                         min_same_generations=0.95)


def test_loglikelihood_rolling_matches_hflm(runtime, family):
    from lm_eval.api.instance import Instance

    recipe = _candidate(_validated(family, "task_arithmetic"), seed=5)
    hf = _hf(family, "task_arithmetic")
    hf.apply(recipe)
    runtime.apply(recipe)
    texts = ["3 plus 4 is 7", "capital of babazan is fentasmu \n color of apkinta is green"]
    requests = [Instance(request_type="loglikelihood_rolling", doc={}, arguments=(t,), idx=0)
                for t in texts]
    reference = Float32Reference(hf)
    exact = reference.lm.loglikelihood_rolling(requests, disable_tqdm=True)
    bounds = [tolerance(U_BF16, ll, reference.n_tokens(r), reference.z) for ll, r in zip(exact, requests)]
    for engine, got in (("vllm", runtime.lm.loglikelihood_rolling(requests)),
                        ("transformers", hf.lm.loglikelihood_rolling(requests, disable_tqdm=True))):
        for value, want, bound in zip(got, exact, bounds):
            assert abs(value - want) <= bound, (engine, value, want, bound)
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


def test_sources_in_differing_vocabularies(family, tmp_path_factory):
    """tokenizer_source over vocabularies that differ: the engine starts in the output
    vocabulary, its live weights after a candidate equal the transformers runtime's bit for
    bit (rows moved at load, as mergekit moves them), and it scores with the built tokenizer."""
    import json

    from hotmerge.runtimes.hf import HFRuntime
    from hotmerge.runtimes.vllm import VLLMRuntime
    from hotmerge.scoring.suite import TaskSuite
    from vocab_models import grown, renumbered

    root = tmp_path_factory.mktemp("vocab")
    words = json.loads((family.base / "tokenizer.json").read_text())["model"]["vocab"]
    drop = sorted(words, key=words.get)[4:7]
    models = [grown(family.experts[0], root / "grown", ["<extra_a>", "zorblat"], seed=1),
              renumbered(family.experts[1], root / "renumbered", drop=drop, seed=2)]
    validated = validate_config(parse_config({
        "genome": {"models": models, "base_model": str(family.base), "merge_method": "ties",
                   "layer_granularity": 2, "tokenizer_source": "union"},
        "tasks": ["toy_sum_mc_search"], "apply_chat_template": False, "fewshot_as_multiturn": False,
        "seed": SEED}))
    recipe = _candidate(validated, seed=5)
    hf = HFRuntime(validated, device="cpu", seed=SEED)
    hf.apply(recipe)
    rt = VLLMRuntime(validated, seed=SEED)
    try:
        assert not rt.layout["unmapped"] and len(rt.lm.tokenizer) == validated.vocabulary.size == 182
        rt.apply(recipe)
        live = rt.fetch(rt.source_names)
        state = hf.model.state_dict()
        for name in rt.source_names:
            assert torch.equal(live[name], state[name]), name
        scores = TaskSuite(SUITE_TASKS[:1], lm=rt.lm, limit=8).evaluate(rt.lm)
        assert 0 <= scores.score <= 1
    finally:
        rt.close()
