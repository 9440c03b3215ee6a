"""Inputs that are not what they claim: broken weights, code and pickles in model folders,
bad genotype files, options that cannot work here. Each is refused at start-up in one
line with exit code 2, before any candidate is evaluated, leaves nothing behind, and
runs nothing from the input."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from hotmerge.errors import ConfigError
from hotmerge.models.folder import ModelInfo, iter_tensors

try:
    from tests.test_errors import EVOLVE_OPTIONS, _FakeLLM, _invoke, one_error_line, run_cli, tree
    from tests.tinymodels import make_llama_family
except ImportError:
    from test_errors import EVOLVE_OPTIONS, _FakeLLM, _invoke, one_error_line, run_cli, tree
    from tinymodels import make_llama_family

ATTENTION = "model.layers.1.self_attn.q_proj.weight"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A tiny Llama folder (bf16) with a fine-tune beside it (model_0), never edited: tests copy it."""
    base, _ = make_llama_family(tmp_path_factory.mktemp("tiny"), n_models=1)
    return Path(base)


def copy_of(folder: Path, to: Path) -> Path:
    shutil.copytree(folder, to)
    return to


def edit_tensor(folder: Path, name: str, change) -> None:
    """Rewrite one tensor of a single-file safetensors folder."""
    file = folder / "model.safetensors"
    state = load_file(file)
    state[name] = change(state[name].clone())
    save_file(state, file, metadata={"format": "pt"})


def poisoned(value: float):
    def change(t: torch.Tensor) -> torch.Tensor:
        t.view(-1)[7] = value
        return t
    return change


def genome_config(path: Path, models, base, tasks=("toy_capital_mc_search",)) -> Path:
    path.write_text(yaml.safe_dump({
        "genome": {"models": [str(m) for m in models], "base_model": str(base), "merge_method": "task_arithmetic",
                   "layer_granularity": 2, "normalize": False},
        "tasks": list(tasks), "apply_chat_template": False}))
    return path


def toy_with(toy_family, tmp_path: Path, change_expert=None, change_base=None) -> Path:
    """A toy config whose base or second expert is a changed copy (the rest are the originals)."""
    experts, base = list(toy_family.experts), toy_family.base
    if change_expert is not None:
        experts[1] = copy_of(experts[1], tmp_path / "broken_expert")
        change_expert(experts[1])
    if change_base is not None:
        base = copy_of(base, tmp_path / "broken_base")
        change_base(base)
    return genome_config(tmp_path / "toy.yaml", experts, base)


def read_all(folder: Path) -> None:
    info = ModelInfo.from_path(folder)
    for _ in iter_tensors(info, info.tensors, dtype=torch.bfloat16):
        pass


# -- 1. non-finite values in a source ----------------------------------------------------------------


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_a_non_finite_source_tensor_is_refused_as_it_loads(tiny, tmp_path, value):
    folder = copy_of(tiny, tmp_path / "model")
    read_all(folder)  # the clean copy reads
    edit_tensor(folder, ATTENTION, poisoned(value))
    ModelInfo.from_path(folder)  # headers alone cannot tell
    with pytest.raises(ConfigError) as error:
        read_all(folder)
    message = str(error.value)
    assert str(folder) in message and ATTENTION in message and "inf or NaN" in message


def test_a_finite_source_that_overflows_the_merge_dtype_is_named_so(tiny, tmp_path):
    folder = copy_of(tiny, tmp_path / "model")
    edit_tensor(folder, ATTENTION, lambda t: poisoned(1e6)(t.float()))  # fp32, beyond fp16's range
    info = ModelInfo.from_path(folder)
    list(iter_tensors(info, [ATTENTION], dtype=torch.bfloat16))  # bf16 holds it
    with pytest.raises(ConfigError, match=f"{ATTENTION} holds values beyond the range of torch.float16"):
        list(iter_tensors(info, [ATTENTION], dtype=torch.float16))


def test_evolve_refuses_a_non_finite_source_before_any_candidate(toy_family, tmp_path):
    """Exit 2 naming the folder and the tensor, and no run directory (there was one with
    every candidate failed, exit 1, before)."""
    config = toy_with(toy_family, tmp_path, change_expert=lambda f: edit_tensor(f, ATTENTION, poisoned(float("nan"))))
    run_dir = tmp_path / "run"
    result = _invoke(["evolve", str(config), "--storage-path", str(run_dir), "--max-fevals", "6", *EVOLVE_OPTIONS])
    assert isinstance(result.exception, ConfigError), (result.exception, result.output)
    message = str(result.exception)
    assert str(tmp_path / "broken_expert") in message and ATTENTION in message and "inf or NaN" in message
    assert not run_dir.exists()


@pytest.mark.parametrize("command", ["eval", "export"])
def test_eval_and_export_refuse_a_non_finite_base(toy_family, tmp_path, command):
    config = toy_with(toy_family, tmp_path, change_base=lambda f: edit_tensor(f, ATTENTION, poisoned(float("inf"))))
    out = tmp_path / "out"
    args = ["eval", str(config), "--x0", "--output", str(out / "scores.json")] if command == "eval" else \
        ["export", str(config), str(out), "--x0"]
    result = _invoke(args)
    assert isinstance(result.exception, ConfigError), (result.exception, result.output)
    assert str(tmp_path / "broken_base") in str(result.exception) and ATTENTION in str(result.exception)
    assert not out.exists() and not list(tmp_path.glob("*.partial"))


def test_vllm_worker_hands_a_refused_source_back_as_a_config_error(tiny, tmp_path, monkeypatch):
    """The worker reads every source through the same reader; its ConfigError crosses the rpc
    as {"config_error": ...} and the driver raises it (the engine shut down)."""
    pytest.importorskip("vllm")
    import vllm

    from hotmerge.config.evolve import parse_config, validate_config
    from hotmerge.runtimes import vllm_worker
    from hotmerge.runtimes.vllm import VLLMRuntime

    folder = copy_of(tiny, tmp_path / "model")
    edit_tensor(folder, ATTENTION, poisoned(float("nan")))

    class Worker(vllm_worker.HotmergeWorkerExtension):
        def hotmerge_setup_layout(self, spec):
            for _ in vllm_worker._iter_checkpoint(spec["reference"]):
                pass
            return {}

    monkeypatch.setattr(vllm_worker.vllm_compat, "check", lambda: None)
    answer = Worker().hotmerge_setup({"reference": str(folder)})
    assert set(answer) == {"config_error"} and ATTENTION in answer["config_error"]

    validated = validate_config(parse_config(yaml.safe_load(genome_config(tmp_path / "c.yaml", [tiny.parent / "model_0"], tiny)
                                                            .read_text())))
    monkeypatch.setattr(vllm, "LLM", _FakeLLM)
    monkeypatch.setattr(_FakeLLM, "started", [])
    monkeypatch.setattr(_FakeLLM, "layouts", [answer])
    with pytest.raises(ConfigError, match=ATTENTION):
        VLLMRuntime(validated, prove_writes=False)
    assert _FakeLLM.started[-1].shut_down


# -- 2. integer and quantised tensors ------------------------------------------------------------------


@pytest.mark.parametrize("dtype, code", [(torch.int8, "I8"), (torch.uint8, "U8"), (torch.int32, "I32"),
                                         (torch.float8_e4m3fn, "F8_E4M3"), (torch.float8_e5m2, "F8_E5M2")])
def test_an_integer_or_quantised_tensor_is_refused_from_its_header(tiny, tmp_path, dtype, code):
    folder = copy_of(tiny, tmp_path / "model")
    edit_tensor(folder, ATTENTION, lambda t: t.to(dtype))
    with pytest.raises(ConfigError) as error:
        ModelInfo.from_path(folder)
    message = str(error.value)
    assert str(folder) in message and ATTENTION in message and code in message and "bf16, fp16 or fp32" in message


def test_plan_refuses_an_int8_source_in_one_line(toy_family, tmp_path):
    config = toy_with(toy_family, tmp_path, change_expert=lambda f: edit_tensor(f, ATTENTION, lambda t: t.to(torch.int8)))
    before = tree(tmp_path)
    line = one_error_line(run_cli(["plan", str(config)], cwd=tmp_path))
    assert "genome.models[1]" in line and ATTENTION in line and "I8" in line
    assert tree(tmp_path) == before


# -- 3. pickles and broken config.json ---------------------------------------------------------------


class _Marker:
    """Unpickling this writes a file: proof that a pickle was loaded."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (Path.write_text, (Path(self.path), "unpickled"))


def test_a_folder_of_pickle_checkpoints_is_refused_and_never_unpickled(tiny, tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    shutil.copy(tiny / "config.json", folder / "config.json")
    marker = tmp_path / "MARKER"
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_Marker(str(marker))))
    with pytest.raises(ConfigError) as error:
        ModelInfo.from_path(folder)
    message = str(error.value)
    assert "pytorch_model.bin" in message and "safetensors" in message and "\n" not in message
    assert not marker.exists()


def test_a_config_json_that_is_not_json_is_refused(tiny, tmp_path):
    folder = copy_of(tiny, tmp_path / "model")
    (folder / "config.json").write_text('{"model_type": "llama",')
    with pytest.raises(ConfigError, match="config.json.*fix or re-save the model"):
        ModelInfo.from_path(folder)


# -- 4. code in a model folder --------------------------------------------------------------------------


def plant_code(folder: Path, marker: Path, model_type: str | None = None) -> None:
    """modeling/configuration/tokenization .py files that write `marker` when imported, and
    the auto_map entries that point transformers at them."""
    code = f"from pathlib import Path\nPath({str(marker)!r}).write_text('imported')\n"
    for module, cls in (("modeling_own", "OwnForCausalLM"), ("configuration_own", "OwnConfig"),
                        ("tokenization_own", "OwnTokenizer")):
        (folder / f"{module}.py").write_text(code + f"class {cls}:\n    pass\n")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_own.OwnConfig",
                          "AutoModelForCausalLM": "modeling_own.OwnForCausalLM"}
    if model_type is not None:
        config["model_type"] = model_type
    (folder / "config.json").write_text(json.dumps(config))
    tokenizer_config = folder / "tokenizer_config.json"
    if tokenizer_config.is_file():
        data = json.loads(tokenizer_config.read_text())
        data["auto_map"] = {"AutoTokenizer": ["tokenization_own.OwnTokenizer", None]}
        tokenizer_config.write_text(json.dumps(data))


def test_own_code_of_an_unknown_model_type_is_refused(toy_family, tmp_path):
    marker = tmp_path / "MARKER"
    config = toy_with(toy_family, tmp_path, change_base=lambda f: plant_code(f, marker, model_type="own_llama"))
    line = one_error_line(run_cli(["plan", str(config)], cwd=tmp_path))
    assert "genome.base_model" in line and "modeling_own.py" in line and "own_llama" in line
    assert "never runs code" in line
    assert not marker.exists()


def test_own_code_beside_a_known_model_type_is_ignored_with_one_warning(tiny, tmp_path, caplog):
    from hotmerge.config.evolve import parse_config, validate_config

    folder = copy_of(tiny, tmp_path / "model")
    plant_code(folder, tmp_path / "MARKER")
    config = yaml.safe_load(genome_config(tmp_path / "c.yaml", [folder, tiny.parent / "model_0"], tiny).read_text())
    with caplog.at_level("WARNING", logger="hotmerge"):
        validate_config(parse_config(config))
        validate_config(parse_config(config))
    said = [r.getMessage() for r in caplog.records if "own code" in r.getMessage()]
    assert len(said) == 1 and str(folder) in said[0] and "modeling_own.py" in said[0] and "llama" in said[0]


@pytest.mark.slow  # one hotmerge eval subprocess: model load and lm-eval (15-25 s)
def test_own_code_never_runs_when_a_run_goes_on(toy_family, tmp_path):
    """A planted module that writes a marker when imported: the candidate is scored (the
    reference, its tokenizer and every source loaded) and the marker never appears."""
    marker = tmp_path / "MARKER"
    config = toy_with(toy_family, tmp_path, change_base=lambda f: plant_code(f, marker))
    done = run_cli(["eval", str(config), "--x0", "--output", str(tmp_path / "scores.json")], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    warnings = [line for line in done.stderr.splitlines() if "own code" in line]
    assert len(warnings) == 1 and "broken_base" in warnings[0], done.stderr[-3000:]
    assert (tmp_path / "scores.json").is_file() and not marker.exists()


# -- 5. genotype files ----------------------------------------------------------------------------


@pytest.mark.parametrize("text, words", [
    ("[0.1, 0.2", "cannot read genotype file"),
    (b"\xff\xfe\x00[", "cannot read genotype file"),
    ("[0.1, 0.2]", "holds 2 genes but the config's genome has 3"),
    ('{"genotype": [0.1]}', "holds 1 genes"),
    ("[0.1, NaN, 0.3]", "gene 1 is nan"),
    ("[0.1, 0.2, Infinity]", "gene 2 is inf"),
    ("[0.1, 1e400, 0.3]", "gene 1 is inf"),
    ("[0.1, 1" + "0" * 400 + ", 0.3]", "gene 1 is inf"),
    ('[0.1, "0.2", 0.3]', "no list of numbers"),
    ("[0.1, true, 0.3]", "no list of numbers"),
    ("[[0.1], [0.2], [0.3]]", "no list of numbers"),
    ('{"score": 1}', "no list of numbers"),
])
def test_a_genotype_file_that_is_not_one_is_refused(tmp_path, text, words):
    from hotmerge.cli import _read_genotype

    path = tmp_path / "x.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ConfigError) as error:
        _read_genotype(path, 3)
    assert words in str(error.value) and "\n" not in str(error.value)
    path.write_text('{"genotype": [0.1, -2, 0.3], "score": 0.5}')  # a history line
    assert _read_genotype(path, 3).tolist() == [0.1, -2.0, 0.3]


def test_eval_refuses_a_genotype_of_the_wrong_length_in_one_line(toy_family, tmp_path):
    config = genome_config(tmp_path / "toy.yaml", toy_family.experts, toy_family.base)
    (tmp_path / "x.json").write_text("[0.5, 0.5]")
    line = one_error_line(run_cli(["eval", str(config), "--genotype", str(tmp_path / "x.json")], cwd=tmp_path))
    assert "holds 2 genes" in line


# -- 6. options that cannot work here -------------------------------------------------------------


def test_runtime_options_that_cannot_work_are_refused():
    from hotmerge.runtimes import check_runtime_options

    check_runtime_options("hf", "cpu", 1)
    check_runtime_options("vllm", None, 1)
    with pytest.raises(ConfigError, match="--tensor-parallel-size 2 .*transformers runtime.*--vllm"):
        check_runtime_options("hf", None, 2)
    with pytest.raises(ConfigError, match="--device cpu is for the transformers runtime"):
        check_runtime_options("vllm", "cpu", 1)
    tp, words = _unusable_tensor_parallel_size()
    with pytest.raises(ConfigError, match=words):
        check_runtime_options("vllm", None, tp)


def _unusable_tensor_parallel_size() -> tuple:
    """A tensor-parallel size this machine cannot run, and the words its refusal holds: one GPU
    more than there are, or on vLLM's CPU build, one worker more than the cores."""
    if torch.cuda.is_available():
        gpus = torch.cuda.device_count()
        return max(2, gpus + 1), f"needs {max(2, gpus + 1)} GPUs but this machine has {gpus}"
    cores = len(os.sched_getaffinity(0))
    return cores + 1, f"may use {cores} cores: use a --tensor-parallel-size of at most {cores}"


@pytest.mark.parametrize("command", ["evolve", "eval"])
@pytest.mark.parametrize("extra", [[], ["--vllm"]])
def test_a_tensor_parallel_size_it_cannot_use_is_refused(toy_family, tmp_path, command, extra):
    tp, words = _unusable_tensor_parallel_size()
    tp = str(tp)
    if not extra:
        words = "transformers runtime"
    config = genome_config(tmp_path / "toy.yaml", toy_family.experts, toy_family.base)
    written = tmp_path / ("run" if command == "evolve" else "eval.json")
    where = ["--storage-path", str(written)] if command == "evolve" else ["--x0", "--output", str(written)]
    result = _invoke([command, str(config), *where, "--tensor-parallel-size", tp, *extra])
    assert isinstance(result.exception, ConfigError), (result.exception, result.output)
    assert f"--tensor-parallel-size {tp}" in str(result.exception) and words in str(result.exception)
    assert not written.exists()
