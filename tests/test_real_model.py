"""The real-model path on a real pretrained model: SmolLM2-135M-Instruct (Llama, 30 layers,
GQA, tied embeddings, a 49k byte-level BPE with a chat template) and two synthetic experts
of it, one stored sharded (tests/smol_models.py).

One transformers worker (a ties genome over three layer groups, scored with the chat
template), one export of the merge config the genome writes for its candidate x, and one
mergekit merge of that file are shared by the module; the vLLM test starts one engine.
The worker computes in float32 (compute_dtype): the same bf16 merges, about 6x faster on
CPUs without bf16 instructions, where every token of this model costs a 135M-parameter
forward pass.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from hotmerge.config.evolve import parse_config, validate_config
from hotmerge.config.merge import load_merge_config
from hotmerge.run.export import export_merge
from hotmerge.search.worker import CandidateWorker
from hotmerge.toy.taskfiles import TASKS_DIR
from parity import assert_equal_to_mergekit, folder_tensors

SEED = 0
LAYER_GRANULARITY = 10  # three groups of the 30 layers

# Few and short: every token costs a forward pass of the 135M model (bf16 on the CPU).
MC_DOCS = [
    ("The capital of France is", ["Paris", "London", "Berlin"], 0),
    ("Water freezes at", ["100 degrees Celsius", "0 degrees Celsius", "50 degrees Celsius"], 1),
    ("The largest planet of the solar system is", ["Mars", "Venus", "Jupiter"], 2),
    ("Bees make", ["milk", "honey", "wool"], 1),
]
GEN_DOCS = [
    ("What is the capital of Italy? Answer with one word.", "Rome"),
    ("How many legs does a spider have? Answer with a number.", "8"),
]
TASK_YAML = {
    "real_mc": """task: real_mc
custom_dataset: !function realdata.load
dataset_kwargs:
  data_file: real_mc.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "{{question}}"
doc_to_choice: "{{choices}}"
doc_to_target: "{{label}}"
target_delimiter: " "
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
""",
    "real_gen": """task: real_gen
custom_dataset: !function realdata.load
dataset_kwargs:
  data_file: real_gen.jsonl
test_split: test
output_type: generate_until
doc_to_text: "{{question}}"
doc_to_target: "{{answer}}"
target_delimiter: " "
generation_kwargs:
  until: ["\\n", "<|im_end|>"]
  do_sample: false
  max_gen_toks: 6
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    ignore_case: true
    ignore_punctuation: true
metadata:
  version: 1.0
""",
}
TASKS = [{"name": "real_mc", "metric": "acc,none"}, {"name": "real_gen", "metric": "exact_match,none"}]


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory) -> Path:
    return write_tasks(tmp_path_factory.mktemp("real_tasks"))


def write_tasks(folder: Path) -> Path:
    # the toy's loader reads a jsonl beside itself (no network); a name of its own here
    (folder / "realdata.py").write_text((TASKS_DIR / "toydata.py").read_text())
    (folder / "real_mc.jsonl").write_text("".join(
        json.dumps({"question": q, "choices": c, "label": label}) + "\n" for q, c, label in MC_DOCS))
    (folder / "real_gen.jsonl").write_text("".join(
        json.dumps({"question": q, "answer": a}) + "\n" for q, a in GEN_DOCS))
    for name, text in TASK_YAML.items():
        (folder / f"{name}.yaml").write_text(text)
    return folder


def _validated(smol_family, tasks_dir, method: str, compute_dtype: str = "bfloat16"):
    return validate_config(parse_config({
        "genome": {"models": [str(p) for p in smol_family.experts], "base_model": str(smol_family.base),
                   "merge_method": method, "layer_granularity": LAYER_GRANULARITY},
        "tasks": TASKS, "apply_chat_template": True, "fewshot_as_multiturn": True,
        "task_paths": [str(tasks_dir)], "seed": SEED, "compute_dtype": compute_dtype}))


def _genotype(genome, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0.3, 1.0, genome.size)


@pytest.fixture(scope="module")
def worker(smol_family, tasks_dir):
    """The transformers runtime with the tasks' requests built once (chat template on)."""
    w = CandidateWorker(_validated(smol_family, tasks_dir, "ties", compute_dtype="float32"), seed=SEED)
    yield w
    w.close()


@pytest.fixture(scope="module")
def x(worker) -> np.ndarray:
    return _genotype(worker.genome, seed=1)


@pytest.fixture(scope="module")
def merge_config(worker, x, tmp_path_factory) -> Path:
    """The mergekit merge config the genome writes for x (best_config.yaml)."""
    path = tmp_path_factory.mktemp("real_config") / "best_config.yaml"
    path.write_text(yaml.safe_dump(worker.genome.to_mergekit_config(x)))
    return path


@pytest.fixture(scope="module")
def exported(merge_config, tmp_path_factory) -> Path:
    """`hotmerge export best_config.yaml OUT` (the command's own two calls)."""
    validated, recipe = load_merge_config(merge_config)
    return export_merge(validated, recipe, tmp_path_factory.mktemp("real_export") / "merged")


def _base_tensors(smol_family) -> dict:
    return load_file(str(smol_family.base / "model.safetensors"))


def test_family_is_the_real_model(smol_family):
    from hotmerge.models.folder import ModelInfo

    base = ModelInfo.from_path(smol_family.base)
    assert base.num_layers == 30 and base.tie_word_embeddings and "lm_head.weight" not in base.tensors
    assert base.config["num_key_value_heads"] < base.config["num_attention_heads"]  # GQA
    sharded = ModelInfo.from_path(smol_family.experts[1])
    assert (smol_family.experts[1] / "model.safetensors.index.json").is_file()
    assert len({t.file for t in sharded.tensors.values()}) > 1 and sharded.tensors.keys() == base.tensors.keys()


def test_live_weights_are_the_exported_merge(worker, x, exported, smol_family):
    """Every parameter of the live model is written by the merge: after candidate x the
    transformers runtime's weights equal the exported merge of x's merge config, tensor for
    tensor (the embedding and every norm included), and every one of them moved off the
    base; the tied output layer is the merged embedding."""
    worker.runtime.apply(worker.genome.decode(x))
    worker.applied = None  # written behind the worker's back: it must not take them for its own
    model = worker.runtime.model
    live = dict(model.named_parameters())  # the tied lm_head is listed once, as the embedding
    ours = folder_tensors(exported)
    base = _base_tensors(smol_family)
    assert live.keys() == ours.keys() == base.keys()
    assert "model.embed_tokens.weight" in live and sum(n.endswith("norm.weight") for n in live) == 2 * 30 + 1
    for name, param in live.items():
        assert torch.equal(worker.runtime.merged[name], ours[name]), name  # the bf16 merge
        assert torch.equal(param.data, ours[name].float()), name  # what the model computes with
        assert not torch.equal(ours[name], base[name]), f"{name} is the base's"
    assert model.get_output_embeddings().weight.data_ptr() == live["model.embed_tokens.weight"].data_ptr()
    config = json.loads((exported / "config.json").read_text())
    assert config["tie_word_embeddings"] is True


@pytest.mark.slow
def test_scores_equal_simple_evaluate_with_the_chat_template(worker, x, exported, tasks_dir):
    """hotmerge's score of x, with the tokenizer's own chat template, equals
    lm_eval.simple_evaluate(model="hf", apply_chat_template=True) on the exported merge
    (loaded in float32, as the worker computes): the same prompts, the same per-request
    responses, the same metrics."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    mine = worker.evaluate(x)
    assert mine["error"] is None
    assert all(inst.resps[0].strip() for inst in worker.suite.tasks["real_gen"].instances)  # it says something
    prompt = worker.suite.requests["loglikelihood"][0].arguments[0]
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n")
    out = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={exported},dtype=float32", tasks=[t["name"] for t in TASKS],
        batch_size=64, device="cpu", apply_chat_template=True, fewshot_as_multiturn=True, log_samples=True,
        task_manager=TaskManager(include_path=str(tasks_dir), include_defaults=False))
    for task in TASKS:
        name = task["name"]
        for metric, value in mine["results"][name].items():
            assert out["results"][name][metric] == pytest.approx(value, rel=1e-9), (name, metric)
        theirs = {s["doc_id"]: s for s in out["samples"][name]}
        instances = worker.suite.tasks[name].instances
        assert len(theirs) == len({inst.doc_id for inst in instances})
        for inst in instances:
            sample = theirs[inst.doc_id]
            assert list(sample["arguments"][inst.idx]) == list(inst.arguments), (name, inst.doc_id)
            assert sample["resps"][inst.idx] == inst.resps, (name, inst.doc_id)


@pytest.mark.slow
def test_export_equals_mergekit(merge_config, exported, smol_family, tmp_path_factory):
    """`hotmerge export` of the merge config equals mergekit-yaml's merge of the same file
    within bf16 rounding, one source sharded: the same tensors (no lm_head where the base ties
    it), the same tied config, and the base's tokenizer with its chat template."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    config = yaml.safe_load(merge_config.read_text())
    out = tmp_path_factory.mktemp("real_mergekit") / "merged"
    run_merge(MergeConfiguration.model_validate(config), str(out),
              MergeOptions(copy_tokenizer=True, lazy_unpickle=False, random_seed=0))
    theirs = folder_tensors(out)
    ours = folder_tensors(exported)
    assert ours.keys() == theirs.keys() and "lm_head.weight" not in ours
    _, recipe = load_merge_config(merge_config)
    assert_equal_to_mergekit(recipe, ours, theirs)
    for folder in (exported, out):
        assert json.loads((folder / "config.json").read_text())["tie_word_embeddings"] is True
    from transformers import AutoTokenizer

    base_tok, our_tok, their_tok = (AutoTokenizer.from_pretrained(p) for p in (smol_family.base, exported, out))
    assert our_tok.chat_template == their_tok.chat_template == base_tok.chat_template is not None
    assert our_tok.get_vocab() == their_tok.get_vocab() == base_tok.get_vocab()


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")
def test_vllm_runtime_equals_transformers(worker, smol_family, tasks_dir):
    """A dare_ties candidate: the vLLM runtime maps every tensor of the real model, its live
    weights equal the transformers runtime's bit for bit, its adapter renders the same
    chat-template prompts, and its logprobs of those prompts are within bf16's bound of the
    exact (float32) model's."""
    from hotmerge.runtimes.vllm import VLLMRuntime
    from hotmerge.scoring.suite import TaskSuite
    from test_vllm_runtime import U_BF16, _token_logprobs, _vllm_logprobs, tolerance

    validated = _validated(smol_family, tasks_dir, "dare_ties")
    recipe = validated.genome().decode(_genotype(validated.genome(), seed=2))
    worker.runtime.apply(recipe)
    worker.applied = None
    runtime = VLLMRuntime(validated, seed=SEED)
    try:
        assert not runtime.layout["unmapped"]
        runtime.apply(recipe)
        live = runtime.fetch(runtime.source_names)
        for name in runtime.source_names:
            assert torch.equal(live[name], worker.runtime.merged[name]), name
        cfg = validated.config
        suite = TaskSuite(cfg.tasks, include_paths=cfg.task_paths, apply_chat_template=True,
                          fewshot_as_multiturn=True, lm=runtime.lm)
        for kind, requests in worker.suite.requests.items():
            assert [r.arguments for r in suite.requests[kind]] == [r.arguments for r in requests], kind
        # the engine computes the same model: the worker's float32 model holds the exact upcast
        # of the same bf16 weights; every token's logprob within bf16's bound of its value
        prompts = [runtime.lm.tok_encode(context + continuation)
                   for context, continuation in (r.arguments for r in suite.requests["loglikelihood"][::4])]
        z = []
        hook = worker.runtime.model.get_output_embeddings().register_forward_hook(
            lambda module, args, out: z.append(float(out.detach().abs().max())))
        try:
            exact = _token_logprobs(worker.runtime.model, prompts)
        finally:
            hook.remove()
        for values, want in zip(_vllm_logprobs(runtime, prompts), exact):
            bound = np.array([tolerance(U_BF16, lp, 1, max(z)) for lp in want])
            assert (np.abs(values - want) <= bound).all(), (values - want, bound)
    finally:
        runtime.close()
