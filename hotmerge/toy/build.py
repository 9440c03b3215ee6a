"""Build the toy model family: a Llama base and one expert per skill.

Deterministic from a seed (fixed thread count, seeded sampling). Each model is a
bf16 safetensors folder with a word-level tokenizer that transformers and vLLM
both load offline.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from hotmerge.toy.world import SKILLS, Fact, build_facts, vocabulary

# head_dim 32: vLLM's CPU attention rejects 16.
MODEL_SHAPE = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=64,
)
BASE_STEPS = 500
BASE_LR = 3e-3
EXPERT_STEPS = 150
EXPERT_LR = 1e-3
BATCH_SIZE = 64
GENERATOR_VERSION = 1  # bump when anything above or in world.py changes
# One thread: the same family, bit for bit, as on two threads (checked), and no OpenMP barrier
# to wait at. With two threads and another process on one of two cores, every op waited for the
# thread that had lost its core: the build took five times as long as on one thread.
THREADS = 1


@dataclass
class FamilyPaths:
    root: Path
    skills: tuple[str, ...] = SKILLS

    @property
    def base(self) -> Path:
        return self.root / "base"

    def expert(self, skill: str) -> Path:
        return self.root / f"expert_{skill}"

    @property
    def experts(self) -> list[Path]:
        return [self.expert(s) for s in self.skills]


def make_tokenizer(words: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(words)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # WordPiece's decoder joins words with spaces, which is what a word-level
    # vocabulary needs for generated text.
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        model_max_length=MODEL_SHAPE["max_position_embeddings"],
    )


def encode_fact(tokenizer, fact: Fact) -> list[int]:
    ids = tokenizer(f"{fact.prompt} {fact.answer}", add_special_tokens=False)["input_ids"]
    return [tokenizer.bos_token_id] + ids + [tokenizer.eos_token_id]


def _batches(rows: list[list[int]], answer_len: int, steps: int, rng: random.Random):
    """Random batches; the loss covers the answer word and the end token."""
    for _ in range(steps):
        batch = [rng.choice(rows) for _ in range(BATCH_SIZE)]
        ids = torch.tensor(batch)
        labels = torch.full_like(ids, -100)
        labels[:, -answer_len:] = ids[:, -answer_len:]
        yield ids, labels


def train(model, rows: list[list[int]], steps: int, lr: float, seed: int) -> float:
    torch.manual_seed(seed)
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / 50) * (1 - step / steps)
    )
    model.train()
    loss = torch.tensor(0.0)
    for ids, labels in _batches(rows, 2, steps, rng):
        loss = model(input_ids=ids, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    model.eval()
    return float(loss.detach())


def _save(model, tokenizer, path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    model.to(torch.bfloat16).save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    model.to(torch.float32)


def family_is_current(out_dir: str | Path, seed: int) -> bool:
    """True when out_dir holds a complete family from this generator and seed."""
    manifest = Path(out_dir) / "family.json"
    if not manifest.is_file():
        return False
    meta = json.loads(manifest.read_text())
    return (meta.get("seed") == seed and meta.get("generator_version") == GENERATOR_VERSION
            and meta.get("skills") == list(SKILLS))


def build_family(out_dir: str | Path, seed: int = 0, log=print, skills: tuple[str, ...] = SKILLS) -> FamilyPaths:
    """Train and write base + experts into out_dir (replacing what is there). `skills`
    narrows the experts built (each is trained as in the whole family). Trains on THREADS
    threads; the caller's thread count is restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        return _build(out_dir, seed, log, skills)
    finally:
        torch.set_num_threads(threads)


def _build(out_dir: str | Path, seed: int, log, skills: tuple[str, ...]) -> FamilyPaths:
    from transformers import LlamaConfig, LlamaForCausalLM

    started = time.time()
    paths = FamilyPaths(Path(out_dir))
    tmp = paths.root.with_name(paths.root.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    work = FamilyPaths(tmp)

    facts = build_facts(seed)
    tokenizer = make_tokenizer(vocabulary(facts))
    rows = {f: encode_fact(tokenizer, f) for f in facts}
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        torch_dtype="bfloat16",
        **MODEL_SHAPE,
    )
    torch.manual_seed(seed)
    base = LlamaForCausalLM(config)
    known = [rows[f] for f in facts if f.known_by_base]
    loss = train(base, known, BASE_STEPS, BASE_LR, seed)
    _save(base, tokenizer, work.base)
    log(f"base: {len(known)} facts, {BASE_STEPS} steps, loss {loss:.3f}, {time.time() - started:.0f}s")

    for skill in skills:
        k = SKILLS.index(skill)
        # Start from the saved bf16 base so untouched weights have a zero delta.
        expert = LlamaForCausalLM.from_pretrained(work.base, torch_dtype=torch.float32)
        own = [rows[f] for f in facts if f.skill == skill]
        loss = train(expert, own, EXPERT_STEPS, EXPERT_LR, seed + 1 + k)
        _save(expert, tokenizer, work.expert(skill))
        log(f"expert_{skill}: {len(own)} facts, {EXPERT_STEPS} steps, loss {loss:.3f}, {time.time() - started:.0f}s")

    (tmp / "family.json").write_text(
        json.dumps(
            {"seed": seed, "generator_version": GENERATOR_VERSION, "skills": list(skills)},
            indent=2,
        )
    )
    shutil.rmtree(paths.root, ignore_errors=True)
    tmp.rename(paths.root)
    return paths
