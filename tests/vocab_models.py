"""Toy sources whose vocabularies differ, made cheaply from the toy family's folders.

`grown` is a fine-tune that added tokens: its tokenizer gains them as added tokens and
its embedding and output matrices gain a row each (seeded values). `renumbered` drops
some tokens and moves the others to new ids, with its rows moved to match."""

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")


def _set_vocab_size(folder: Path, size: int) -> None:
    config = json.loads((folder / "config.json").read_text())
    config["vocab_size"] = size
    (folder / "config.json").write_text(json.dumps(config, indent=2))


def grown(source, out, tokens, seed: int = 0) -> str:
    """A copy of `source` with `tokens` added to its tokenizer and one new row per token."""
    from transformers import AutoTokenizer

    out = Path(out)
    shutil.copytree(source, out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    old = len(tokenizer)
    tokenizer.add_tokens(list(tokens))
    tokenizer.save_pretrained(out)
    new = len(tokenizer)
    gen = torch.Generator().manual_seed(seed)
    tensors = load_file(str(out / "model.safetensors"))
    for name in VOCAB_TENSORS:
        t = tensors[name]
        rows = (torch.randn((new - old, t.shape[1]), generator=gen) * t.float().std()).to(t.dtype)
        tensors[name] = torch.cat([t, rows])
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    _set_vocab_size(out, new)
    return str(out)


def renumbered(source, out, drop=(), seed: int = 0) -> str:
    """A copy of `source` without the tokens `drop`, the remaining words at shuffled ids
    (the four special tokens keep theirs), rows moved to match."""
    out = Path(out)
    shutil.copytree(source, out)
    tokenizer = json.loads((out / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    by_id = sorted(vocab, key=vocab.get)
    special, words = by_id[:4], [w for w in by_id[4:] if w not in drop]
    order = torch.randperm(len(words), generator=torch.Generator().manual_seed(seed)).tolist()
    kept = special + [words[i] for i in order]
    tokenizer["model"]["vocab"] = {token: i for i, token in enumerate(kept)}
    (out / "tokenizer.json").write_text(json.dumps(tokenizer))
    old_ids = torch.tensor([vocab[token] for token in kept])
    tensors = load_file(str(out / "model.safetensors"))
    for name in VOCAB_TENSORS:
        tensors[name] = tensors[name][old_ids].contiguous()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    _set_vocab_size(out, len(kept))
    return str(out)
