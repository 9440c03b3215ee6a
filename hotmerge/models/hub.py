"""Model references as mergekit reads them, resolved to local folders.

A reference is `model` or `model+lora` (mergekit's ModelReference), and each part is a
folder or a Hugging Face hub repository name, either one optionally `@revision`
(mergekit's ModelPath). A part that names an existing folder (beside the config file,
then in the working directory) is that folder, as in mergekit. Any other part that is
a repository name is fetched into the Hugging Face cache with `snapshot_download`,
safetensors, json and tokenizer files only: never pickled weights, never code. With
HF_HUB_OFFLINE=1 it comes from the cache alone, and a name that is not there is one
line naming the command that downloads it.

This is the one place model names meet the hub: everything after it reads local
folders (models/folder.py).
"""

from __future__ import annotations

import fnmatch
import logging
import os
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from hotmerge.errors import ConfigError
from hotmerge.models.folder import PICKLE_PATTERNS

# What a merge and its tokenizer need from a repository (mergekit fetches
# tokenizer.model, *.json and *.safetensors). Sentencepiece, BPE and tiktoken files
# cover the tokenizers transformers builds without code.
ALLOW_PATTERNS = ("*.safetensors", "*.json", "tokenizer.model", "spiece.model", "merges.txt", "vocab.txt",
                  "*.tiktoken")
# The files without which a snapshot holds no model (or adapter) hotmerge can read.
REQUIRED = {"model": ("config.json", "*.safetensors"),
            "adapter": ("adapter_config.json", "adapter_model.safetensors")}

LOG = logging.getLogger("hotmerge")

_cache: Optional[Path] = None


def use_cache(folder) -> None:
    """Resolve hub names into `folder` (a Hugging Face cache layout) from now on in this
    process; None: the Hugging Face cache (HF_HUB_CACHE, or HF_HOME/hub)."""
    global _cache
    _cache = Path(folder).expanduser().absolute() if folder is not None else None


def cache_dir() -> str:
    from huggingface_hub import constants

    return str(_cache) if _cache is not None else constants.HF_HUB_CACHE


def offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


@dataclass(frozen=True)
class Part:
    """One half of a reference: a folder or a repository name, and the revision asked for."""

    name: str
    revision: Optional[str] = None

    def __str__(self) -> str:
        return f"{self.name}@{self.revision}" if self.revision else self.name


def split_reference(value: str) -> tuple[Part, Optional[Part]]:
    """`model[@rev][+lora[@rev]]` as mergekit splits it (ValueError: why it is not one)."""
    chunks = value.split("+")
    if len(chunks) > 2:
        raise ValueError(f"'{value}' has more than one +: write model+adapter, one adapter per model")
    if len(chunks) == 2 and not (chunks[0].strip() and chunks[1].strip()):
        raise ValueError(f"'{value}' is not model+adapter: give both, e.g. models/base+adapters/lora "
                         "or org/model+org/adapter")
    parts = []
    for chunk in chunks:
        name, at, revision = chunk.partition("@")
        if "@" in revision:
            raise ValueError(f"'{value}' has more than one @ in {chunk}: write name@revision")
        if at and not (name.strip() and revision.strip()):
            raise ValueError(f"'{value}' is not name@revision: give both, e.g. org/model@main")
        parts.append(Part(name, revision if at else None))
    return parts[0], (parts[1] if len(parts) == 2 else None)


def normalize_reference(value: str, base_dir=None) -> str:
    """A reference as a config holds it once read (ValueError: why it is not one): each
    part that names an existing path becomes that absolute path, a hub name stays as
    written (`name@revision`), any other path becomes absolute for the folder checks to
    name. Reads no more than whether paths exist: resolve_reference does the rest."""
    return "+".join(_normalize_part(part, base_dir) for part in _parts(value))


def resolve_reference(value: str) -> str:
    """The local folders of a normalised reference, `folder` or `folder+adapter_folder`:
    hub names fetched into (or, offline, found in) the cache. ConfigError: why not."""
    model, lora = split_reference(value)
    resolved = _resolve_part(model, "model")
    return f"{resolved}+{_resolve_part(lora, 'adapter')}" if lora is not None else resolved


def _parts(value: str) -> list[Part]:
    model, lora = split_reference(value)
    return [model] if lora is None else [model, lora]


def _normalize_part(part: Part, base_dir) -> str:
    local = _local_folder(part.name, base_dir)
    if local is not None:
        if part.revision is not None:
            raise ValueError(f"'{part}' names the local folder {local} with a revision, which only a hub "
                             f"repository has: drop @{part.revision}, or name the hub repository")
        return local
    if _is_repo_name(part.name):
        return str(part)
    if part.revision is not None:
        raise ValueError(f"'{part}' is neither an existing folder nor a hub repository name (org/name): fix it")
    return os.path.normpath(os.path.abspath(os.path.expanduser(part.name)))


def _resolve_part(part: Part, kind: str) -> str:
    if os.path.isabs(part.name):
        return part.name  # a path: the folder checks name what is wrong with it
    return _from_hub(part, kind)


def _local_folder(name: str, base_dir) -> Optional[str]:
    """The existing path a name means locally (beside the config file, then the working
    directory), or None."""
    candidates = [name] if os.path.isabs(name) else (
        ([os.path.join(base_dir, name)] if base_dir is not None else []) + [name])
    for candidate in candidates:
        if os.path.exists(os.path.expanduser(candidate)):
            return os.path.normpath(os.path.abspath(os.path.expanduser(candidate)))
    return None


def _is_repo_name(name: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def download_command(part: Part) -> str:
    """The command that puts a repository's files where resolution looks for them."""
    words = ["hf", "download", part.name]
    if part.revision is not None:
        words += ["--revision", part.revision]
    for pattern in ALLOW_PATTERNS:
        words += ["--include", pattern]
    if _cache is not None:
        words += ["--cache-dir", str(_cache)]
    return ("HF_HUB_OFFLINE=0 " if offline() else "") + shlex.join(words)


def _from_hub(part: Part, kind: str) -> str:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    what = "model folder" if kind == "model" else "adapter folder"
    get = f"download it with `{download_command(part)}`"
    try:
        # Online, the hub's files for the revision; unreachable or offline, the cached snapshot.
        folder = snapshot_download(part.name, revision=part.revision, cache_dir=cache_dir(),
                                   allow_patterns=list(ALLOW_PATTERNS))
    except LocalEntryNotFoundError:  # not in the cache, and nothing could be downloaded
        why = " (HF_HUB_OFFLINE=1: nothing is downloaded)" if offline() else " and the hub cannot be reached"
        raise ConfigError(
            f"{part} is no local {what} (relative paths are looked up beside the config file, then in the "
            f"current directory) and does not exist in the Hugging Face cache {cache_dir()}{why}: fix the path, "
            f"or {get}") from None
    except RevisionNotFoundError:
        raise ConfigError(f"{part}: the hub repository {part.name} has no revision {part.revision}: "
                          "give a branch, tag or commit it has") from None
    except GatedRepoError:  # before RepositoryNotFoundError, its base
        raise ConfigError(f"{part} is a gated hub repository: accept its terms on huggingface.co and log in "
                          "(`hf auth login`), then run again") from None
    except RepositoryNotFoundError:
        raise ConfigError(f"{part} is no local {what} and no hub repository you can read: fix the name or "
                          "the path (or log in with `hf auth login` for a private one)") from None
    except (HfHubHTTPError, OSError) as e:
        raise ConfigError(f"cannot fetch {part} from the Hugging Face hub ({type(e).__name__}: "
                          f"{' '.join(str(e).split())[:160]}): check the connection, or {get}") from None
    files = [str(p.relative_to(folder)) for p in Path(folder).rglob("*") if p.is_file()]
    _check_snapshot(part, kind, folder, files)
    if not offline():
        LOG.warning("note: %s is %s (from the Hugging Face hub, or its cache where the hub is unreachable)",
                    part, folder)
    return os.path.normpath(folder)


def _check_snapshot(part: Part, kind: str, folder: str, files: list[str]) -> None:
    """A resolved snapshot must hold a config and safetensors weights (pickles are never
    fetched, so a repository of pickle weights alone arrives without weights)."""
    def has(pattern):
        return any(fnmatch.fnmatch(f, pattern) for f in files)

    config, weights = REQUIRED[kind]
    if not has(weights):
        pickles = sorted(f for f in files if any(fnmatch.fnmatch(f, p) for p in PICKLE_PATTERNS))
        held = f"only pickle checkpoints ({', '.join(pickles[:3])})" if pickles else "no safetensors weights"
        if pickles or not offline():
            raise ConfigError(
                f"{part} holds {held} in {folder}; hotmerge fetches and loads safetensors only (unpickling can "
                "run code): use a repository or revision with safetensors weights, or convert it (load it where "
                "you trust it and save_pretrained(..., safe_serialization=True))")
    missing = [p for p in (config, weights) if not has(p)]
    if missing:
        fix = (f"download it with `{download_command(part)}`" if offline()
               else f"give a {'PEFT adapter' if kind == 'adapter' else 'model'} repository")
        raise ConfigError(f"{part} has no {' and no '.join(missing)} in {folder}: {fix}")
