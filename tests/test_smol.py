"""The smol family: its world, its shipped task files and the `toy` commands around it.

Building the family (conversion plus three CPU fine-tunes) takes minutes, so it is not in
this suite; README.md ("The smol family") records its measurement and how to repeat it.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hotmerge.toy import families
from hotmerge.toy.smol_taskfiles import PREFIX, render_tasks, task_name
from hotmerge.toy.smol_world import ANSWERS, FACTS_PER_SKILL, SKILLS, build_facts
from hotmerge.toy.taskfiles import TASKS_DIR


def test_shipped_task_files_match_the_generator():
    shipped = {p.name: p.read_text() for p in TASKS_DIR.iterdir() if p.name.startswith(PREFIX)}
    assert shipped == render_tasks(seed=0)


def test_world_is_deterministic_with_disjoint_keys_and_splits():
    facts = build_facts(0)
    assert facts == build_facts(0) and facts != build_facts(1)
    assert len({f.key.lower() for f in facts}) == len(facts) == len(SKILLS) * FACTS_PER_SKILL
    search = [f for f in facts if f.split == "search"]
    heldout = [f for f in facts if f.split == "heldout"]
    assert len(search) >= 500 and len(heldout) >= 300  # the racing and stderr needs
    for skill in SKILLS:
        answers = [f.answer for f in facts if f.skill == skill]
        assert set(answers) == set(ANSWERS[skill])  # every answer used, none outside the pool


@pytest.mark.slow  # the smol_family fixture converts the GGUF base once per machine (about a minute)
def test_tasks_build_with_and_without_the_chat_template(smol_tokenizer):
    from hotmerge.scoring.suite import TaskSuite

    class Spec:
        def __init__(self, name, metric):
            self.name, self.metric, self.weight = name, metric, 1.0

    class ChatLM:  # what TaskSuite reads from an LM to apply the chat template
        tokenizer = smol_tokenizer
        tokenizer_name = "smol"

        def apply_chat_template(self, history, add_generation_prompt=True):
            return smol_tokenizer.apply_chat_template(history, tokenize=False,
                                                      add_generation_prompt=add_generation_prompt)

    specs = [Spec(task_name("capital", "gen", "heldout"), "exact_match,none"),
             Spec(task_name("color", "mc", "search"), "acc,none")]
    plain = TaskSuite(specs)
    chat = TaskSuite(specs, apply_chat_template=True, lm=ChatLM())
    gen_plain = plain.requests["generate_until"][0].args[0]
    gen_chat = chat.requests["generate_until"][0].args[0]
    assert gen_plain.startswith("The capital of ") and gen_plain.endswith(" is")
    assert gen_chat.startswith("<|im_start|>system") and gen_plain in gen_chat
    assert gen_chat.endswith("<|im_start|>assistant\n")
    assert len(chat.requests["loglikelihood"]) == len(plain.requests["loglikelihood"]) == 180 * 4


@pytest.fixture(scope="module")
def smol_tokenizer(smol_family):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smol_family.base)


@pytest.mark.slow  # as above
def test_gguf_conversion_gives_an_ordinary_folder(smol_family, smol_tokenizer):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(smol_family.base)
    assert (config.num_hidden_layers, config.num_key_value_heads, config.tie_word_embeddings) == (30, 3, True)
    assert not hasattr(config, "quantization_config")
    assert smol_tokenizer.chat_template and smol_tokenizer.eos_token == "<|im_end|>"
    for skill in SKILLS:  # one token each, so that max_gen_toks and the loss cover the whole answer
        for answer in ANSWERS[skill]:
            assert len(smol_tokenizer(" " + answer, add_special_tokens=False)["input_ids"]) == 1, answer
    model = AutoModelForCausalLM.from_pretrained(smol_family.base, dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    ids = smol_tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=2, do_sample=False)
    assert smol_tokenizer.decode(out[0, ids.shape[1]:]).startswith(" Paris")


def _hotmerge(*args):
    return subprocess.run([sys.executable, "-m", "hotmerge", *args], capture_output=True, text=True)


def _hotmerge_side_by_side(*commands) -> list[subprocess.CompletedProcess]:
    """Several hotmerge commands run at once (each spends its time importing), in order."""
    processes = [subprocess.Popen([sys.executable, "-m", "hotmerge", *args], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for args in commands]
    done = []
    for process in processes:
        out, err = process.communicate(timeout=300)
        done.append(subprocess.CompletedProcess(process.args, process.returncode, out, err))
    return done


def test_family_options_are_checked(tmp_path):
    wheel, out = tmp_path / "w.whl", str(tmp_path / "f")
    big, toy_wheel, no_wheel, table = _hotmerge_side_by_side(
        ("toy", "build", "--family", "big", out),
        ("toy", "build", "--wheel", str(wheel), out),
        ("toy", "build", "--family", "smol", "--wheel", str(wheel), out),
        ("toy", "table", str(tmp_path)))
    assert big.returncode == 2 and "--family 'big' is not a family: use one of toy, smol" in big.stderr
    assert toy_wheel.returncode == 2 and "--wheel is for --family smol only" in toy_wheel.stderr
    assert no_wheel.returncode == 2 and f"--wheel {wheel} is not a file" in no_wheel.stderr
    assert table.returncode == 2 and "holds no model family (no family.json)" in table.stderr
    assert not (tmp_path / "f").exists()


def test_each_family_names_its_own_tasks():
    toy, smol = families.family("toy"), families.family("smol")
    assert toy.tasks("mc", "heldout")["capital"] == "toy_capital_mc_heldout"
    assert smol.tasks("gen", "search") == {s: f"smol_{s}_gen_search" for s in SKILLS}
    assert families.metric(smol.compare_variant) == "exact_match,none"


@pytest.mark.slow  # two transformers runtimes on the toy family
def test_float32_compute_holds_the_same_bf16_merge(toy_family, tmp_path):
    import dataclasses

    import numpy as np
    import torch

    from hotmerge.config.evolve import load_config, validate_config
    from hotmerge.errors import ConfigError
    from hotmerge.runtimes import start_runtime
    from hotmerge.search.worker import CandidateWorker
    from runs import search_config

    validated = validate_config(load_config(search_config(toy_family, tmp_path / "toy.yaml")))
    as_float32 = dataclasses.replace(
        validated, config=validated.config.model_copy(update={"compute_dtype": "float32"}))
    workers = [CandidateWorker(v) for v in (validated, as_float32)]
    x = np.linspace(0.2, 0.9, workers[0].genome.size)
    results = [w.evaluate(x) for w in workers]
    bf16, fp32 = (dict(w.runtime.model.named_parameters()) for w in workers)
    for name, param in fp32.items():
        assert param.dtype == torch.float32
        assert torch.equal(param.data, bf16[name].data.float()), name
    for task, metrics in results[0]["results"].items():
        assert results[1]["results"][task]["acc,none"] == pytest.approx(metrics["acc,none"], abs=0.02)
    with pytest.raises(ConfigError, match="compute_dtype float32 is for the transformers runtime"):
        start_runtime(as_float32, backend="vllm")


# Building the family takes minutes: this check runs on a family built beforehand, e.g.
#   hotmerge toy build --family smol .cache/smol
#   HOTMERGE_SMOL_FAMILY=.cache/smol pytest tests/test_smol.py -k specialise -s
@pytest.mark.skipif(not os.environ.get("HOTMERGE_SMOL_FAMILY"), reason="set HOTMERGE_SMOL_FAMILY to a built family")
def test_experts_specialise_and_task_arithmetic_combines_them(tmp_path, capsys):
    from hotmerge.toy.build import FamilyPaths
    from hotmerge.toy.evaluate import lm_eval_metrics

    family = FamilyPaths(Path(os.environ["HOTMERGE_SMOL_FAMILY"]), SKILLS)
    merged = _task_arithmetic_merge(family, TASK_ARITHMETIC_WEIGHT, tmp_path / "merged")
    models = {"base": family.base} | {f"expert_{s}": family.expert(s) for s in SKILLS}
    models[f"task_arithmetic (weight {TASK_ARITHMETIC_WEIGHT})"] = merged
    tasks = {s: task_name(s, "gen", "heldout") for s in SKILLS}
    table = {}
    for name, path in models.items():
        scores = lm_eval_metrics(path, list(tasks.values()), dtype="float32")
        table[name] = {s: scores[t] for s, t in tasks.items()}
    mean = {name: sum(v for v, _ in row.values()) / len(row) for name, row in table.items()}
    with capsys.disabled():
        print("\nsmol family, held-out generation (exact_match ± stderr):")
        for name, row in table.items():
            cells = "  ".join(f"{s}={v:.3f}±{se:.3f}" for s, (v, se) in row.items())
            print(f"  {name:28s} {cells}  mean={mean[name]:.3f}")

    for skill in SKILLS:
        own = table[f"expert_{skill}"][skill][0]
        assert own >= table["base"][skill][0] + 0.5, f"expert_{skill} is not clearly above the base"
        others = [table[f"expert_{o}"][skill][0] for o in SKILLS if o != skill]
        assert own >= max(others) + 0.5, f"expert_{skill} is not the best on {skill}"
    best_expert = max(mean[f"expert_{s}"] for s in SKILLS)
    ta = mean[f"task_arithmetic (weight {TASK_ARITHMETIC_WEIGHT})"]
    assert ta >= best_expert + 0.2, f"task_arithmetic mean {ta:.3f} is not above the best expert's + 0.2"


# Each task vector is a whole fine-tune: summed at weight 1 they overshoot a little
# (README: the smol family).
TASK_ARITHMETIC_WEIGHT = 0.7


def _task_arithmetic_merge(family, weight: float, out: Path) -> Path:
    """A plain task_arithmetic merge of the experts, made by mergekit itself."""
    config = {
        "merge_method": "task_arithmetic",
        "base_model": str(family.base),
        "models": [{"model": str(p), "parameters": {"weight": weight}} for p in family.experts],
        "dtype": "bfloat16",
    }
    (out.parent / "ta.yaml").write_text(yaml.safe_dump(config))
    mergekit_yaml = Path(sys.executable).parent / "mergekit-yaml"
    subprocess.run([str(mergekit_yaml), str(out.parent / "ta.yaml"), str(out)], check=True, capture_output=True)
    return out


def test_compare_scores_sources_and_recipes_of_the_run_family(search_run):
    """`toy compare` finds the family from the run's base model and scores every row."""
    done = _hotmerge("toy", "compare", str(search_run.run_dir))
    assert done.returncode == 0, done.stderr[-2000:]
    for row in ("base", "expert_capital", "expert_color", "expert_sum", "x0 recipe", "best recipe"):
        assert row in done.stdout
    assert "toy heldout split, mc (acc)" in done.stdout and "best recipe - x0 recipe = " in done.stdout
