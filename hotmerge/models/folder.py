"""What a model folder holds, read from config.json and safetensors headers only.

No weights are loaded: a safetensors file starts with an 8-byte little-endian header
length and a JSON header mapping tensor names to dtype, shape and byte offsets.
"""

from __future__ import annotations

import json
import logging
import os
import re
import struct
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

from hotmerge.errors import ConfigError

_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def layer_index(tensor_name: str) -> Optional[int]:
    """The N in `...layers.N....` (e.g. model.layers.3.mlp.up_proj.weight -> 3), else None."""
    m = _LAYER_RE.search(tensor_name)
    return int(m.group(1)) if m else None


def layer_stack(tensor_name: str) -> Optional[str]:
    """The name of the stack of numbered layers a tensor is in (`model.layers.`), else None."""
    m = _LAYER_RE.search(tensor_name)
    return tensor_name[: m.start(1)] if m else None


def layer_stacks(tensor_names) -> dict[str, int]:
    """{stack: layer count} of each stack of numbered layers (`model.layers.`; a
    vision-language model also has its vision tower's), counted from the names."""
    stacks: dict[str, int] = {}
    for name in tensor_names:
        stack = layer_stack(name)
        if stack is not None:
            stacks[stack] = max(stacks.get(stack, 0), layer_index(name) + 1)
    return stacks


def is_derived_buffer(tensor_name: str) -> bool:
    """Tensors some checkpoints store that are computed from config.json, not learned
    (rotary inverse frequencies): the same in every source, never merged."""
    return tensor_name.endswith("rotary_emb.inv_freq")


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype code: "BF16", "F16", "F32", ...
    file: str  # file name inside the model folder

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass
class ModelInfo:
    path: str
    config: dict
    architectures: list[str]
    model_type: Optional[str]
    num_layers: int
    tie_word_embeddings: bool
    tensors: dict[str, TensorInfo] = field(default_factory=dict)
    # code the folder ships (auto_map entries, *.py files): never run, see _own_code
    own_code: tuple[str, ...] = ()
    lora: Optional[str] = None  # a PEFT adapter folded into the weights when they are read
    # mergekit's output vocabulary (models/vocab.py): embedding and output matrices are read
    # with their rows moved into it
    vocabulary: Optional[object] = None
    # whether transformers' AutoModelForCausalLM builds it (the runtimes score only those;
    # export merges any architecture transformers knows, tensor by tensor)
    causal_lm: bool = True

    @property
    def reference(self) -> str:
        """The model as a config names it: the folder, or mergekit's `model+adapter`."""
        return f"{self.path}+{self.lora}" if self.lora is not None else self.path

    @classmethod
    def from_path(cls, path) -> "ModelInfo":
        """A model folder, or mergekit's `model+adapter` (a PEFT LoRA adapter folder)."""
        path, plus, adapter = str(path).partition("+")
        if plus:
            adapter_config = Path(adapter) / "adapter_config.json"
            if not adapter_config.is_file():
                raise ConfigError(f"{adapter} has no adapter_config.json: give a PEFT adapter folder "
                                  "(saved with save_pretrained) after the +")
            if not (Path(adapter) / "adapter_model.safetensors").is_file():
                pickles = sorted(p.name for pattern in PICKLE_PATTERNS for p in Path(adapter).glob(pattern))
                held = (f"holds only pickle weights ({', '.join(pickles[:3])}), which hotmerge never loads "
                        "(unpickling can run code)") if pickles else "has no adapter_model.safetensors"
                raise ConfigError(f"adapter {adapter} {held}: save the adapter with "
                                  "save_pretrained(..., safe_serialization=True)")
            return replace(cls.from_path(path), lora=str(Path(adapter)))
        folder = Path(path)
        if not folder.is_dir():
            raise ConfigError(
                f"model folder {path} does not exist: give the path of a local "
                "Hugging Face model folder (config.json + *.safetensors)"
            )
        config_file = folder / "config.json"
        if not config_file.is_file():
            raise ConfigError(
                f"{path} has no config.json: point to a Hugging Face model folder "
                "saved with save_pretrained()"
            )
        try:
            config = json.loads(config_file.read_text())
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot read {config_file}: {e}: fix or re-save the model") from e
        if not isinstance(config, dict):
            raise ConfigError(f"{config_file} is not a JSON object: re-save the model")

        tensors = _read_tensor_index(folder)
        _check_floating(folder, tensors)
        own_code = _own_code(folder, config)
        causal_lm = _is_causal_lm(folder, config)
        num_layers = _num_layers(config)
        if num_layers is None:
            raise ConfigError(
                f"{config_file} has no num_hidden_layers: only decoder models with a "
                "num_hidden_layers entry are supported"
            )
        tie = config.get("tie_word_embeddings")
        if tie is None:
            tie = config.get("text_config", {}).get("tie_word_embeddings")
        if tie is None:
            # transformers' own default is True; the weights tell the real story.
            tie = "lm_head.weight" not in tensors
        archs = config.get("architectures") or []
        return cls(
            path=str(folder),
            config=config,
            architectures=list(archs),
            model_type=config.get("model_type"),
            num_layers=num_layers,
            tie_word_embeddings=bool(tie),
            tensors=tensors,
            own_code=own_code,
            causal_lm=causal_lm,
        )

    def layer_tensors(self, layer: int) -> list[str]:
        return [n for n in self.tensors if layer_index(n) == layer]

    def non_layer_tensors(self) -> list[str]:
        return [n for n in self.tensors if layer_index(n) is None]


def _num_layers(config: dict) -> Optional[int]:
    for cfg in (config, config.get("text_config") or {}):
        n = cfg.get("num_hidden_layers")
        if isinstance(n, int) and not isinstance(n, bool):
            return n
    return None


# Bytes per element of the safetensors dtype codes (the format's own list).
DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}
RESAVE = "re-download or re-save the model"
# What a merge reads: floating-point weights. Integer and 8-bit float codes are quantised
# (or not weights at all), and arithmetic on their stored values is not a merge.
FLOAT_DTYPES = ("BF16", "F16", "F32", "F64")
# Pickle checkpoints: loading one runs whatever code the file names, so hotmerge never does.
PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")


def _check_floating(folder: Path, tensors: dict[str, TensorInfo]) -> None:
    for name, info in tensors.items():
        if info.dtype not in FLOAT_DTYPES:
            raise ConfigError(
                f"{folder}: tensor {name} is stored as {info.dtype}, an integer or quantised type where merging "
                "needs floating-point weights: use a bf16, fp16 or fp32 checkpoint of the model (dequantise it)")


def _own_code(folder: Path, config: dict) -> tuple[str, ...]:
    """The code a model folder ships: config.json's and tokenizer_config.json's auto_map
    entries and its *.py files. hotmerge never imports it (every transformers call passes
    trust_remote_code=False): a model_type transformers knows is built by transformers'
    own classes, anything else is refused."""
    found = ["auto_map in config.json"] if config.get("auto_map") else []
    try:
        tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        tokenizer_config = None
    if isinstance(tokenizer_config, dict) and tokenizer_config.get("auto_map"):
        found.append("auto_map in tokenizer_config.json")
    found += sorted(p.name for p in folder.glob("*.py"))
    if not found:
        return ()
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    model_type = config.get("model_type")
    if model_type not in CONFIG_MAPPING_NAMES:
        raise ConfigError(
            f"{folder} needs its own code ({', '.join(found)}) to build model_type {model_type!r}, which this "
            "transformers does not know, and hotmerge never runs code from a model folder: merge models of an "
            "architecture transformers supports")
    return tuple(found)


def _is_causal_lm(folder: Path, config: dict) -> bool:
    """Whether transformers' AutoModelForCausalLM builds the model (False for the other
    architectures transformers knows, such as Llava's vision-language models); a model
    type transformers does not know is refused before any weight is read."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = config.get("model_type")
    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return True
    if model_type in CONFIG_MAPPING_NAMES:
        return False
    archs = ", ".join(config.get("architectures") or []) or "no architectures listed"
    raise ConfigError(f"{folder} has model_type {model_type!r} ({archs}), which this transformers does not know: "
                      "merge models of an architecture transformers supports")


def require_causal_lm(infos) -> None:
    """Refuse, before any weight is read, to score models that transformers'
    AutoModelForCausalLM does not build: both runtimes load the merged model as one."""
    for info in infos:
        if info is not None and not info.causal_lm:
            archs = ", ".join(info.architectures) or "no architectures listed"
            raise ConfigError(f"{info.path} is a {info.model_type} model ({archs}), which hotmerge's runtimes do "
                              "not score (they load causal language models): merge it with hotmerge export, "
                              "or search models that AutoModelForCausalLM builds")


_WARNED_OWN_CODE: set[str] = set()


def warn_own_code(info: ModelInfo) -> None:
    """Say once per folder (and process) that the code the folder ships is ignored."""
    if not info.own_code or info.path in _WARNED_OWN_CODE:
        return
    _WARNED_OWN_CODE.add(info.path)
    logging.getLogger("hotmerge").warning(
        "warning: %s ships its own code (%s), which hotmerge never runs: transformers' own %s classes build "
        "the model", info.path, ", ".join(info.own_code), info.model_type)


def _read_tensor_index(folder: Path) -> dict[str, TensorInfo]:
    index_file = folder / "model.safetensors.index.json"
    weight_map = None
    if index_file.is_file():
        try:
            weight_map = json.loads(index_file.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ConfigError(
                f"cannot read {index_file} ({e}): re-save the model with save_pretrained()"
            ) from e
        if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
        ):
            raise ConfigError(
                f"{index_file}: weight_map is not a mapping of tensor names to file names: "
                "re-save the model with save_pretrained()"
            )
        files = sorted(set(weight_map.values()))
    else:
        files = sorted(p.name for p in folder.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for pattern in PICKLE_PATTERNS for p in folder.glob(pattern))
        if pickles:
            raise ConfigError(
                f"{folder} holds only pickle checkpoints ({', '.join(pickles[:3])}), which hotmerge never loads "
                "(unpickling can run code): convert the model to safetensors (load it where you trust it and "
                "save_pretrained(..., safe_serialization=True))")
        raise ConfigError(
            f"{folder} has no *.safetensors files: re-save the model with "
            "save_pretrained(..., safe_serialization=True)"
        )
    tensors: dict[str, TensorInfo] = {}
    for name in files:
        for tname, info in _read_header(folder / name).items():
            if tname in tensors:
                raise ConfigError(f"tensor {tname} is in both {tensors[tname].file} and {name} "
                                  f"of {folder}: {RESAVE}")
            tensors[tname] = info
    if weight_map is not None:
        for tname, file in weight_map.items():
            if tensors.get(tname) is None or tensors[tname].file != Path(file).name:
                raise ConfigError(f"{index_file} puts tensor {tname} in {file}, which does not hold "
                                  f"it: {RESAVE}")
    return tensors


def _read_header(file: Path) -> dict[str, TensorInfo]:
    """The tensors of one safetensors file, after checking that the file holds what its
    header promises: every tensor's byte range matches its dtype and shape, and the file
    is long enough for all of them (a download or copy cut short is caught here, before
    anything is loaded)."""
    if not file.is_file():
        raise ConfigError(f"{file} is missing: {RESAVE}")
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            start = f.read(8)
            if len(start) < 8:
                raise ConfigError(f"{file} is {size} bytes, too short for a safetensors file: {RESAVE}")
            (n,) = struct.unpack("<Q", start)
            if 8 + n > size:
                raise ConfigError(f"{file} is cut short: its header alone needs {8 + n} bytes but the "
                                  f"file has {size}: {RESAVE}")
            header = json.loads(f.read(n))
    except (OSError, ValueError, struct.error) as e:
        raise ConfigError(f"{file} is not a valid safetensors file ({e}): {RESAVE}") from e
    if not isinstance(header, dict):
        raise ConfigError(f"{file} is not a valid safetensors file (its header is not a JSON object): {RESAVE}")
    data_bytes = size - 8 - n
    needed = 0
    out = {}
    for tname, meta in header.items():
        if tname == "__metadata__":
            continue
        problem = _entry_problem(meta)
        if problem is not None:
            raise ConfigError(f"{file}: the header entry of tensor {tname} {problem}: {RESAVE}")
        info = TensorInfo(shape=tuple(meta["shape"]), dtype=meta["dtype"], file=file.name)
        begin, end = meta["data_offsets"]
        itemsize = DTYPE_BYTES.get(info.dtype)
        if itemsize is not None and end - begin != info.numel * itemsize:
            raise ConfigError(f"{file}: tensor {tname} ({info.dtype}, shape {list(info.shape)}) needs "
                              f"{info.numel * itemsize} bytes but its header gives it {end - begin}: {RESAVE}")
        needed = max(needed, end)
        out[tname] = info
    if needed > data_bytes:
        raise ConfigError(f"{file} is cut short: its header describes {needed} bytes of tensor data but "
                          f"the file holds {data_bytes} (an interrupted download or copy?): {RESAVE}")
    return out


def _entry_problem(meta) -> Optional[str]:
    """What is wrong with one tensor's header entry, or None."""
    if not isinstance(meta, dict):
        return "is not a JSON object"
    dtype, shape, offsets = meta.get("dtype"), meta.get("shape"), meta.get("data_offsets")
    if not isinstance(dtype, str):
        return "has no dtype"
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        return "has no shape of non-negative integers"
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets)
            or offsets[0] > offsets[1]):
        return "has no data_offsets [begin, end]"
    return None


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def iter_tensors(info: ModelInfo, names, dtype=None, device="cpu"):
    """(name, tensor) for each of `names`, read one at a time from the files the folder's
    header index (single file or sharded with model.safetensors.index.json) assigns them.

    The one reader of model weights: so a stray *.safetensors beside the shards (a
    consolidated copy, say) is never read, and a missing tensor, or one that holds inf or
    NaN, is a ConfigError naming the model and the tensor. A model
    read in another vocabulary (info.vocabulary) has its embedding and output rows moved
    into it, in the dtype asked for."""
    names = list(names)
    alignment = info.vocabulary
    if alignment is None:
        yield from _read_tensors(info, names, dtype, device)
        return
    for name, tensor in _read_tensors(info, names, dtype, "cpu"):
        if name in alignment.axes:
            tensor = alignment.align(info.reference, name, tensor)
        yield name, tensor.to(device=device)


def _read_tensors(info: ModelInfo, names: list, dtype, device):
    from safetensors import safe_open

    if info.lora is not None:
        yield from _folded_tensors(info, names, dtype, device)
        return
    missing = [n for n in names if n not in info.tensors]
    if missing:
        raise ConfigError(f"{info.path} lacks tensor {missing[0]}: merge only models with the base's layout")
    by_file: dict[str, list[str]] = {}
    for name in names:
        by_file.setdefault(info.tensors[name].file, []).append(name)
    for file, file_names in by_file.items():
        with safe_open(str(Path(info.path) / file), framework="pt", device="cpu") as f:
            for name in file_names:
                tensor = f.get_tensor(name)
                yield name, _finite(info, name, tensor, tensor.to(dtype=dtype or tensor.dtype, device=device))


FINITE_CHUNK = 1 << 24  # elements per isfinite pass: bounds its temporary mask to 16 MiB


def _finite(info: ModelInfo, name: str, stored, read):
    """`read` (the tensor as stored, cast to the dtype asked for), once it is known to hold no
    inf or NaN: one such value makes every candidate's merge non-finite, so the source is
    refused as it loads instead of every candidate failing."""
    if _all_finite(read):
        return read
    if _all_finite(stored):
        raise ConfigError(f"{info.reference}: tensor {name} holds values beyond the range of {read.dtype} "
                          f"once cast from {stored.dtype}: merge in a wider dtype, or rescale the checkpoint")
    raise ConfigError(f"{info.reference}: tensor {name} holds inf or NaN values, so every merge with it would "
                      "too: re-download the model, or use a checkpoint saved before training diverged")


def _all_finite(tensor) -> bool:
    import torch

    return all(bool(torch.isfinite(chunk).all()) for chunk in tensor.reshape(-1).split(FINITE_CHUNK))


def _folded_tensors(info: ModelInfo, names, dtype, device):
    """The weights of `model+adapter`: the adapter folded in once, as mergekit folds it
    (transformers loads the model, PEFT's merge_and_unload, both with their defaults;
    see mergekit.common.ModelReference.merged)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(info.path, trust_remote_code=False, use_safetensors=True)
        folded = PeftModel.from_pretrained(model, info.lora, is_trainable=False).merge_and_unload()
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(f"cannot fold the adapter {info.lora} into {info.path} ({type(e).__name__}: "
                          f"{' '.join(str(e).split())[:200]}): give an adapter trained on that model") from None
    state = folded.state_dict()
    del model, folded
    missing = [n for n in names if n not in state]
    if missing:
        raise ConfigError(f"{info.path}+{info.lora} lacks tensor {missing[0]} once folded: merge only models "
                          "with the base's layout")
    for name in names:
        tensor = state.pop(name)
        yield name, _finite(info, name, tensor, tensor.to(dtype=dtype or tensor.dtype, device=device))


def sources_identity(references, base: Optional[str], vocabulary: Optional[dict] = None) -> dict:
    """What reading these models' weights depends on, found without reading them: the key
    of the statistics cache (kernels/stats_cache.py). references: the models in order (a
    folder or `model+adapter`); vocabulary: models/vocab.py's alignment_spec, when the
    sources are read in another vocabulary (with the files of a tokenizer_source folder)."""
    out = {"models": [_reference_identity(r) for r in references],
           "base": _reference_identity(base) if base is not None else None}
    if vocabulary is not None:
        out["vocabulary"] = vocabulary
        source = (vocabulary.get("settings") or {}).get("source")
        if isinstance(source, str) and Path(source).is_dir():
            out["tokenizer_source"] = _folder_identity(source)
    return out


def _reference_identity(reference: str) -> dict:
    path, plus, adapter = str(reference).partition("+")
    out = _folder_identity(path)
    if plus:
        out["adapter"] = _folder_identity(adapter)
    return out


def _folder_identity(folder) -> dict:
    """Every file of a folder by name, size, mtime_ns and inode (following links, as hub
    snapshots link to blobs). A rewrite, a touch, or a file replaced by another (a new
    inode, even with the same size and time) changes it. Hashing the contents would cost
    the very pass over the weights that the cache saves; a hash of the safetensors headers
    would add a read per file and catch nothing these miss but a rewrite in place that
    also sets the old time back."""
    files = []
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if entry.is_file():
            st = entry.stat()
            files.append([entry.name, st.st_size, st.st_mtime_ns, st.st_ino])
    return {"path": str(Path(folder).resolve()), "files": files}
