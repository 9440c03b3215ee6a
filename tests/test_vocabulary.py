"""Sources whose vocabularies differ (tokenizer_source, the tokenizer: section): hotmerge's
export equals mergekit 0.1.5's merge of the same config, rows that only some models have
included, and the search runs on them; without tokenizer_source they are refused up front."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from hotmerge.config.evolve import parse_config, validate_config
from hotmerge.config.merge import read_merge_config
from hotmerge.errors import ConfigError
from hotmerge.models.folder import iter_tensors
from hotmerge.run.export import export_merge
from parity import ambiguous_elements
from vocab_models import VOCAB_TENSORS, grown, renumbered

ULPS = 4  # mergekit rounds to bf16 after every step, hotmerge once (see test_parity.py)


@pytest.fixture(scope="module")
def family(toy_family, tmp_path_factory):
    """base; grown: expert_capital + two added tokens; renumbered: expert_color without three
    words, the others at new ids; grown2: expert_sum + one token grown has and one of its own."""
    root = tmp_path_factory.mktemp("vocab")
    words = sorted(json.loads((toy_family.base / "tokenizer.json").read_text())["model"]["vocab"].items(),
                   key=lambda kv: kv[1])
    drop = [w for w, _ in words[4:7]]
    return {
        "base": str(toy_family.base),
        "grown": grown(toy_family.experts[0], root / "grown", ["<extra_a>", "zorblat"], seed=1),
        "renumbered": renumbered(toy_family.experts[1], root / "renumbered", drop=drop, seed=2),
        "grown2": grown(toy_family.experts[2], root / "grown2", ["<extra_a>", "<extra_c>"], seed=3),
    }


def _models(models, params):
    return [{"model": m, "parameters": p} for m, p in zip(models, params)]


def _cases(f):
    base, g, r, g2 = f["base"], f["grown"], f["renumbered"], f["grown2"]
    return {
        # <extra_a>: in grown and grown2, not the base (their mean); zorblat, <extra_c>: one
        # donor each; the dropped words: the base's rows in renumbered
        "task_arithmetic-union": {
            "merge_method": "task_arithmetic", "base_model": base, "dtype": "bfloat16",
            "tokenizer_source": "union",
            "models": _models([g, r, g2], [{"weight": 0.5}, {"weight": 0.7}, {"weight": 0.9}])},
        "ties-section-tokens-padding": {
            "merge_method": "ties", "base_model": base, "dtype": "bfloat16",
            "tokenizer": {"source": "union", "pad_to_multiple_of": 64, "tokens": {
                "newtok": {"source": {"kind": "zero"}},
                "<extra_a>": {"source": g2, "force": True},
                "zorblat": {"source": {"kind": "model_token", "model": r, "token": "capital"}},
                "<extra_c>": {"source": {"kind": "model_token", "model": g, "token_id": 7}, "force": True}}},
            "models": _models([g, r, g2], [{"weight": 0.5, "density": 0.5}, {"weight": 0.7, "density": 0.6},
                                           {"weight": 0.8, "density": 0.7}])},
        "linear-base": {
            "merge_method": "linear", "base_model": base, "dtype": "bfloat16", "tokenizer_source": "base",
            "models": _models([base, g, r], [{"weight": 0.2}, {"weight": 0.5}, {"weight": 0.3}])},
        "task_arithmetic-model-path": {
            "merge_method": "task_arithmetic", "base_model": base, "dtype": "bfloat16", "tokenizer_source": g,
            "parameters": {"lambda": 0.8},
            "models": _models([g, r], [{"weight": 0.6}, {"weight": 0.7}])},
    }


CASE_NAMES = list(_cases({k: k for k in ("base", "grown", "renumbered", "grown2")}))


def _mergekit(config: dict, out: Path) -> dict:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    run_merge(MergeConfiguration.model_validate(config), str(out),
              MergeOptions(copy_tokenizer=False, lazy_unpickle=False, random_seed=0, quiet=True))
    return load_file(str(out / "model.safetensors"))


def _vocab(folder) -> dict:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder).get_vocab()


def _in_order_of(tensor: torch.Tensor, ours: dict, theirs: dict) -> torch.Tensor:
    """A vocabulary matrix of ours with its rows at mergekit's ids (mergekit's `union` gives
    the tokens the base lacks ids in hash order); padding rows stay where they are."""
    ids = torch.tensor([ours[t] for t in sorted(theirs, key=theirs.get)])
    return torch.cat([tensor[ids], tensor[len(ids):]])


def _assert_equal_to_mergekit(validated, recipe, out: Path, theirs_dir: Path, theirs: dict) -> None:
    ours = load_file(str(out / "model.safetensors"))
    ours_vocab, their_vocab = _vocab(out), _vocab(theirs_dir)
    assert set(ours_vocab) == set(their_vocab)
    assert json.loads((out / "config.json").read_text())["vocab_size"] == \
        json.loads((theirs_dir / "config.json").read_text())["vocab_size"]
    assert set(ours) == set(theirs)
    # the sources as hotmerge reads them (aligned), for the tolerances
    infos = {info.reference: info for info in [*validated.models, validated.base] if info is not None}
    names = list(ours)
    sources = {ref: dict(iter_tensors(info, names, dtype=torch.bfloat16)) for ref, info in infos.items()}
    for name in VOCAB_TENSORS:
        ours[name] = _in_order_of(ours[name], ours_vocab, their_vocab)
        for tensors in sources.values():
            tensors[name] = _in_order_of(tensors[name], ours_vocab, their_vocab)
    models = [sources[m] for m in recipe.models]
    base = sources[recipe.base_model] if recipe.base_model else None
    lam = abs(recipe.lambda_)
    bad_total = 0
    for name, a in ours.items():
        a32, b32 = a.float(), theirs[name].float()
        assert a32.shape == b32.shape, name
        tolerance = ULPS * torch.maximum(a32.abs(), b32.abs()) * 2.0 ** -7
        if base is not None:
            deltas = sum((s[name].float() - base[name].float()).abs() for s in models)
            tolerance = tolerance + 2.0 ** -6 * max(1.0, lam) * deltas
            bad = (a32 - b32).abs() > tolerance
            params = recipe.tensor(name).params
            bad &= ~ambiguous_elements(recipe.method, params, base[name], [s[name] for s in models],
                                       dtype=torch.bfloat16, rescale=recipe.rescale)
        else:
            tolerance = tolerance + 2.0 ** -7 * sum(s[name].float().abs() for s in models)
            bad = (a32 - b32).abs() > tolerance
        bad_total += int(bad.sum())
    assert bad_total == 0, f"{bad_total} elements differ from mergekit beyond bf16 rounding"


@pytest.mark.parametrize("case", CASE_NAMES)
def test_merge_config_over_vocabularies_equals_mergekit(family, tmp_path, case):
    config = _cases(family)[case]
    validated, recipe = read_merge_config(config)
    assert validated.reference.vocabulary is not None  # rows are moved
    out = export_merge(validated, recipe, tmp_path / "ours")
    theirs = _mergekit(config, tmp_path / "mergekit")
    _assert_equal_to_mergekit(validated, recipe, out, tmp_path / "mergekit", theirs)
    if config.get("tokenizer_source") != "union" and "tokenizer" not in config:
        assert _vocab(out) == _vocab(tmp_path / "mergekit")  # no hash order: the same ids


def test_rows_only_some_models_have_follow_mergekits_rules(family):
    """The default row of a token an input lacks: the only owner's, the base's, the mean."""
    validated, _ = read_merge_config(_cases(family)["task_arithmetic-union"])
    vocab = validated.vocabulary.vocab
    name = "model.embed_tokens.weight"
    read = {info.reference: dict(iter_tensors(info, [name], dtype=torch.bfloat16))[name]
            for info in [*validated.models, validated.base]}
    own = {ref: dict(iter_tensors(info.vocabulary.infos[ref], [name], dtype=torch.bfloat16))[name]
           for ref, info in [(i.reference, i) for i in validated.models]}
    g, r, g2, base = family["grown"], family["renumbered"], family["grown2"], family["base"]
    zorblat, extra_a = vocab["zorblat"], vocab["<extra_a>"]
    assert all(torch.equal(read[m][zorblat], own[g][180 + 1]) for m in read)  # the only owner's row
    mean = (torch.zeros(128, dtype=torch.bfloat16) + own[g][180] + own[g2][180]) / 2
    assert torch.equal(read[base][extra_a], mean) and torch.equal(read[r][extra_a], mean)
    assert torch.equal(read[g][extra_a], own[g][180])  # a model that has the token keeps its row
    dropped = [t for t in vocab if vocab[t] < 180 and t not in _vocab(r)]
    assert len(dropped) == 3 and all(torch.equal(read[r][vocab[t]], read[base][vocab[t]]) for t in dropped)


def test_differing_vocabularies_without_tokenizer_source_are_refused_naming_it(family, tmp_path):
    config = {**_cases(family)["task_arithmetic-union"]}
    del config["tokenizer_source"]
    with pytest.raises(ConfigError, match="vocabularies differ.*set tokenizer_source"):
        read_merge_config(config)
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump(config))
    done = subprocess.run([sys.executable, "-m", "hotmerge", "export", str(path), str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=300)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and "tokenizer_source" in lines[0], done.stderr


@pytest.mark.parametrize("change, named", [
    ({"tokenizer": {"source": "base", "tokens": {"newtok": {"source": {"kind": "zero"}}}}}, "newtok"),
    ({"tokenizer": {"source": "union", "tokens": {"<extra_c>": {"force": True}}}}, "no source"),
    ({"tokenizer": {"source": "union", "tokens": {"zorblat": {"source": "BASE"}}}}, "lacks that token"),
    ({"tokenizer": {"source": "union", "tokens": {"zorblat": {"source": {"kind": "model_token", "model": "G",
                                                                            "token_id": 999}}}}}, "row 999"),
    ({"tokenizer": {"source": "union"}, "tokenizer_source": "union"}, "both"),
    ({"tokenizer": {"source": "union", "pad_to_multiple_of": 0}}, "pad_to_multiple_of"),
])
def test_what_mergekit_cannot_merge_is_refused_in_one_line(family, change, named):
    change = json.loads(json.dumps(change).replace('"BASE"', json.dumps(family["base"]))
                        .replace('"G"', json.dumps(family["grown"])))
    config = {**_cases(family)["task_arithmetic-union"], **change}
    if "tokenizer" in change and "tokenizer_source" not in change:
        del config["tokenizer_source"]
    with pytest.raises(ConfigError, match=named) as error:
        read_merge_config(config)
    assert "\n" not in str(error.value)


def _genome(family, models, **extra):
    return {"genome": {"models": models, "base_model": family["base"], "merge_method": "ties",
                       "layer_granularity": 2, **extra},
            "tasks": ["toy_capital_mc_search"], "limit": 8}


def test_slerp_over_more_than_two_vocabularies_is_refused(family):
    cfg = parse_config({"genome": {"models": [family["grown"], family["renumbered"], family["grown2"]],
                                   "merge_method": "slerp", "tokenizer_source": family["grown"]},
                        "tasks": ["t"]})
    with pytest.raises(ConfigError, match="slerp over more than two"):
        validate_config(cfg)


def test_best_config_carries_the_tokenizer_and_mergekit_reproduces_the_merge(family, tmp_path):
    """A genome over differing vocabularies: best_config.yaml (to_mergekit_config) carries the
    tokenizer section, and mergekit's merge of it equals hotmerge's export."""
    section = {"source": "union", "pad_to_multiple_of": 8,
               "tokens": {"<extra_c>": {"source": {"kind": "zero"}, "force": True}}}
    validated = validate_config(parse_config(_genome(family, [family["grown"], family["renumbered"],
                                                              family["grown2"]], tokenizer=section)))
    genome = validated.genome()
    x = genome.x0() * 1.3
    merge_config = genome.to_mergekit_config(x)
    assert merge_config["tokenizer"]["source"] == "union" and merge_config["tokenizer"]["pad_to_multiple_of"] == 8
    out = export_merge(validated, x, tmp_path / "ours")
    theirs = _mergekit(merge_config, tmp_path / "mergekit")
    validated2, recipe = read_merge_config(merge_config)  # the same merge, read back as a merge config
    _assert_equal_to_mergekit(validated2, recipe, out, tmp_path / "mergekit", theirs)


def test_a_candidate_over_differing_vocabularies_is_scored(family):
    """The transformers runtime starts in the output vocabulary (shapes, config, tokenizer)
    and its live weights after a candidate equal the export of that candidate."""
    from hotmerge.search.worker import CandidateWorker

    validated = validate_config(parse_config(_genome(family, [family["grown"], family["renumbered"]],
                                                     tokenizer_source="union")))
    worker = CandidateWorker(validated, device="cpu")
    try:
        model, size = worker.runtime.model, validated.vocabulary.size
        assert model.get_input_embeddings().weight.shape[0] == size == model.config.vocab_size == 182
        assert model.get_output_embeddings().weight.shape[0] == size
        assert len(worker.runtime.tokenizer) == size and "zorblat" in worker.runtime.tokenizer.get_vocab()
        x = worker.genome.x0() * 0.9
        result = worker.evaluate(x, raise_bugs=True)
        assert result["score"] is not None and 0 <= result["score"] <= 1
        live = {k: v.detach().clone() for k, v in model.state_dict().items()}
    finally:
        worker.close()
    merged = load_file(str(export_merge(validated, x, Path(validated.vocabulary.path) / "export")
                           / "model.safetensors"))
    assert all(torch.equal(live[k], merged[k]) for k in merged)
