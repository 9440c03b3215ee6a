"""The transformers runtime: one HF model resident in this process, merged into in place."""

from __future__ import annotations

import logging

import torch

from hotmerge.engine.config import ValidatedConfig
from hotmerge.engine.merger import Merger


def pick_device(device: str | None) -> str:
    if device:
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


class HFRuntime:
    """load once; apply(recipe) writes the candidate into the live weights; `lm` scores."""

    def __init__(self, validated: ValidatedConfig, *, device: str | None = None,
                 batch_size: int | None = None, seed: int = 0):
        from lm_eval.models.huggingface import HFLM
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.device = pick_device(device)
        reference = validated.reference.path
        self.model = AutoModelForCausalLM.from_pretrained(reference, dtype=torch.bfloat16)
        self.model.to(self.device).eval()
        tokenizer_source = validated.config.genome.tokenizer_source
        if tokenizer_source in (None, "base", "union"):
            tokenizer_source = reference
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
        # named_parameters() lists a tied lm_head once, under the embedding's name.
        self.live = {name: p for name, p in self.model.named_parameters()}
        self.merger = Merger(validated, self.live, seed=seed)
        logging.getLogger("lm_eval").setLevel(logging.ERROR)
        self.lm = HFLM(pretrained=self.model, tokenizer=self.tokenizer,
                       batch_size=batch_size or 64, device=self.device)

    @torch.no_grad()
    def apply(self, recipe) -> None:
        self.merger.apply(recipe)
