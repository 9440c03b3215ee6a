"""The output vocabulary a config asks for: `tokenizer_source:` or a `tokenizer:` section.

The schema is mergekit 0.1.5's (`mergekit/tokenizer/config.py`): `tokenizer_source` is
`base`, `union` or a model; the `tokenizer:` section has `source` (default `union`),
`tokens` (per token: where its embedding row comes from, and whether to `force` it) and
`pad_to_multiple_of`. Both spellings become one plain dict (`settings`), which
hotmerge/models/vocab.py builds the vocabulary from and which crosses to vLLM's worker.
"""

from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, field_validator, model_validator

_STRICT = ConfigDict(extra="forbid", frozen=True)
VOCAB_SOURCES = ("base", "union")


class ModelTokenSource(BaseModel):
    """Another token's row of one model: `{kind: model_token, model: M, token_id: I}` (or `token: T`)."""

    model_config = _STRICT

    kind: Literal["model_token"]
    model: str
    token_id: Optional[int] = None
    token: Optional[str] = None

    @model_validator(mode="after")
    def _one_of(self) -> "ModelTokenSource":
        if (self.token_id is None) == (self.token is None):
            raise ValueError("a model_token source takes exactly one of token_id and token: give one")
        return self


class ZeroSource(BaseModel):
    model_config = _STRICT

    kind: Literal["zero"]


class TokenEmbedding(BaseModel):
    """mergekit's TokenEmbeddingConfig: a bare string source is a model reference."""

    model_config = _STRICT

    source: Union[ModelTokenSource, ZeroSource, str, None] = None
    force: bool = False


class TokenizerSection(BaseModel):
    """mergekit's TokenizerConfig (the `tokenizer:` section)."""

    model_config = _STRICT

    source: str = "union"
    tokens: Optional[dict[str, TokenEmbedding]] = None
    pad_to_multiple_of: Optional[int] = None

    @field_validator("pad_to_multiple_of")
    @classmethod
    def _pad(cls, value: Optional[int]) -> Optional[int]:
        if value is not None and value < 1:
            raise ValueError(f"is {value}: use a positive number of rows, or remove it")
        return value


def map_models(section: TokenizerSection, fn) -> TokenizerSection:
    """The section with every model reference (its source, the tokens' sources) replaced by fn(ref)."""
    tokens = None
    if section.tokens is not None:
        tokens = {}
        for token, cfg in section.tokens.items():
            source = cfg.source
            if isinstance(source, str):
                source = fn(source)
            elif isinstance(source, ModelTokenSource):
                source = source.model_copy(update={"model": fn(source.model)})
            tokens[token] = cfg.model_copy(update={"source": source})
    source = section.source if section.source in VOCAB_SOURCES else fn(section.source)
    return section.model_copy(update={"source": source, "tokens": tokens})


def settings_of(tokenizer_source: Optional[str], section: Optional[TokenizerSection]) -> Optional[dict]:
    """The plain settings of a config (None without either spelling):

    {"source": "base" | "union" | model, "tokens": {token: {"source": ..., "force": bool}},
    "pad_to_multiple_of": int | None}, where a token's source is None, {"kind": "zero"},
    {"kind": "model", "model": M} or {"kind": "model_token", "model": M, "token_id": I, "token": T}."""
    if section is None:
        if tokenizer_source is None:
            return None
        section = TokenizerSection(source=tokenizer_source)
    tokens = {}
    for token, cfg in (section.tokens or {}).items():
        source = cfg.source
        if isinstance(source, str):
            source = {"kind": "model", "model": source}
        elif source is not None:
            source = source.model_dump()
        tokens[token] = {"source": source, "force": cfg.force}
    return {"source": section.source, "tokens": tokens, "pad_to_multiple_of": section.pad_to_multiple_of}
