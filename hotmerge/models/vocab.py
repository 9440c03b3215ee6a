"""Sources whose vocabularies differ, aligned as mergekit 0.1.5 aligns them.

With `tokenizer_source` (or a `tokenizer:` section) mergekit builds one output
vocabulary (mergekit/tokenizer/build.py) and, before merging each embedding or output
matrix, moves every model's rows to the output's token ids (PermutedVocabulary in
mergekit/tokenizer/embed.py). This module does the same once, at load: `build` makes
the vocabulary and the per-model permutations, `Alignment.align` gives one model's
matrix in the output vocabulary, and the one weight reader (folder.iter_tensors) hands
out aligned matrices, so every candidate merges aligned rows, in both runtimes.

A token some inputs of the matrix lack gets one default row, the same for every model
that lacks it (mergekit's rules, in order): its `tokens:` entry's source; else the row
of the only input that has it; else zeros when none has it; else the base model's row
when the base is an input and has it; else the mean of the inputs that have it. A
forced token takes its default row in every model. Rows past the vocabulary (up to
`pad_to_multiple_of`) are the mean of the model's aligned rows. Each step computes in
the merge dtype, as mergekit does.

Where mergekit 0.1.5 would crash or pick at random, hotmerge refuses in one line: a
`base` or `union` vocabulary without a base model over tokenizers that differ (mergekit
takes an arbitrary model's), `tokens:` that `source: base` lacks, a tokenizer with ids
at or past its model's vocab_size. Where mergekit's result depends on hash order (the
ids `union` gives tokens the base lacks), hotmerge takes the models in config order and
each vocabulary in id order.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from hotmerge.errors import ConfigError

LOG = logging.getLogger(__name__)


def vocabulary_size(info) -> Optional[int]:
    """config.json's vocab_size (mergekit's get_vocab_size)."""
    for cfg in (info.config, info.config.get("text_config") or {}):
        n = cfg.get("vocab_size")
        if isinstance(n, int) and not isinstance(n, bool):
            return n
    return None


def vocabulary_axes(info) -> dict[str, int]:
    """Source tensors indexed by token id, and that axis: the model's declared input and
    output embeddings (weights and biases), found on a meta-device model as mergekit's
    infer_vocabulary_axes finds them."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(info.path, trust_remote_code=False)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(f"transformers cannot build {info.path} from its config.json ({type(e).__name__}), so its "
                          "embedding tensors are unknown: remove tokenizer_source, or use a model transformers "
                          "supports") from None
    axes = {}
    for module in (model.get_input_embeddings(), model.get_output_embeddings()):
        for p in (getattr(module, "weight", None), getattr(module, "bias", None)):
            if p is not None:
                axes[id(p)] = 0
    return {name: axes[id(p)] for name, p in model.named_parameters(remove_duplicate=False)
            if id(p) in axes and name in info.tensors}


@dataclass
class Vocabulary:
    """The output vocabulary: its tokenizer (saved in `folder`), its size with padding,
    and per model reference the old id of every output id (-1: the model lacks it)."""

    tokenizer: object
    size: int
    permutations: dict  # model reference -> int64 array [len(vocab)]
    original: dict  # model reference -> its tokenizer's vocabulary (models whose tokenizer loads)
    folder: object = field(default=None, repr=False)

    def __post_init__(self):
        self.vocab = self.tokenizer.get_vocab()
        self.by_id = sorted(self.vocab, key=self.vocab.get)
        self.folder = tempfile.TemporaryDirectory(prefix="hotmerge-tokenizer-")
        self.tokenizer.save_pretrained(self.folder.name)

    @property
    def path(self) -> str:
        return self.folder.name

    @property
    def tokens(self) -> int:
        return len(self.vocab)

    def keeps(self, ref: str, rows: int) -> bool:
        """Whether a model's matrix with `rows` rows is already in this vocabulary."""
        p = self.permutations[ref]
        return rows == self.size == len(p) and bool((p == np.arange(len(p))).all())


def _tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path.partition("+")[0], trust_remote_code=False)


def build(settings: dict, infos: dict, base: Optional[str]) -> Vocabulary:
    """mergekit's build_tokenizer over `infos` (model reference -> ModelInfo, config order)."""
    source = settings["source"]
    refs = list(infos)
    if base is not None and base not in infos:
        raise ValueError(f"the base model {base} is not among the models")
    tokenizers = {}
    for ref in ([base] if base is not None else []) + refs:
        if ref in tokenizers:
            continue
        try:
            tokenizers[ref] = _tokenizer(ref)
        except (OSError, ValueError, TypeError) as e:
            if ref == base:
                raise ConfigError(f"tokenizer_source needs the base model's tokenizer, and {ref} has none that "
                                  f"loads ({type(e).__name__}): save the tokenizer with the model") from None
            # mergekit: "Unable to load tokenizer ... Assuming same as base"
            LOG.warning("%s has no tokenizer that loads (%s): its vocabulary is taken to be the base's",
                        ref, type(e).__name__)
    sizes = {ref: vocabulary_size(infos[ref]) for ref in refs}
    for ref, tok in tokenizers.items():
        size = sizes[ref]
        beyond = [t for t, i in tok.get_vocab().items() if size is not None and i >= size]
        if beyond:
            raise ConfigError(f"the tokenizer of {ref} has {len(beyond)} token(s) at ids past its vocab_size {size} "
                              f"(e.g. {beyond[0]!r}), which mergekit 0.1.5 cannot align: resize the model's "
                              "embeddings to its tokenizer (or drop those tokens)")
    if base is None:
        if source in ("base", "union") and len({_id_map(t) for t in tokenizers.values()}) > 1:
            raise ConfigError(f"tokenizer_source {source} over models whose vocabularies differ needs base_model: "
                              "without one mergekit 0.1.5 builds on an arbitrary model's tokenizer; set base_model, "
                              "or name a model folder as tokenizer_source")
        base = refs[0]
        if base not in tokenizers:
            raise ConfigError(f"tokenizer_source {source} needs a tokenizer to build on, and {base} has none that "
                              "loads: save the tokenizer with the model, or set base_model")
    base_tok = tokenizers[base]
    vocab_of = {ref: tokenizers.get(ref, base_tok).get_vocab() for ref in refs}
    if source == "base":
        out = _copy(base_tok)
    elif source == "union":
        out = _union(base_tok, {ref: tokenizers[ref] for ref in [base, *refs] if ref in tokenizers}, sizes)
    else:
        try:
            out = _tokenizer(source)
        except (OSError, ValueError, TypeError) as e:
            raise ConfigError(f"tokenizer_source {source} has no tokenizer that loads ({type(e).__name__}): "
                              "name a model folder saved with its tokenizer") from None
    existing = set(out.get_vocab())
    for token in settings["tokens"]:
        if token in existing:
            continue
        if source == "base":
            # mergekit adds it to the base's own tokenizer, then finds it past the base's rows: a KeyError
            raise ConfigError(f"tokens: {token!r} is not in the base model's vocabulary, which mergekit 0.1.5 cannot "
                              "merge with source: base: use source: union, or a model folder whose tokenizer has it")
        out.add_tokens(token)
        existing.add(token)
    vocab = out.get_vocab()
    if sorted(vocab.values()) != list(range(len(vocab))):
        raise ConfigError(f"the output vocabulary ({source}) has gaps in its token ids, which mergekit 0.1.5 cannot "
                          "fill: use a tokenizer whose ids run from 0 without gaps")
    by_id = sorted(vocab, key=vocab.get)
    permutations = {}
    for ref in refs:
        mine = vocab_of[ref]
        limit = sizes[ref] if sizes[ref] is not None else len(mine)
        p = np.array([mine.get(token, -1) for token in by_id], dtype=np.int64)
        if (p >= limit).any():
            token = by_id[int(np.argmax(p >= limit))]
            raise ConfigError(f"token {token!r} has id {mine[token]} in {ref}, past its vocab_size {limit}, which "
                              "mergekit 0.1.5 cannot align: resize the model's embeddings to its tokenizer")
        permutations[ref] = p
    size = len(vocab)
    pad = settings.get("pad_to_multiple_of")
    if pad and size % pad:
        size = (size // pad + 1) * pad
    return Vocabulary(tokenizer=out, size=size, permutations=permutations,
                      original={ref: tok.get_vocab() for ref, tok in tokenizers.items()})


def _id_map(tokenizer) -> tuple:
    return tuple(sorted(tokenizer.get_vocab().items()))


def _copy(tokenizer):
    """A tokenizer equal to `tokenizer` that can be changed without changing it (saved and
    reloaded, as mergekit's union does)."""
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=False)


def _union(base_tok, tokenizers: dict, sizes: dict):
    """mergekit's build_union_tokenizer: the base's tokenizer plus every other model's tokens
    (its plain tokens first, then the added tokens with their settings), in config order."""
    out_vocab, out_added = {}, {}
    for ref, tok in tokenizers.items():
        limit = sizes[ref] or tok.vocab_size
        vocab = tok.get_vocab()
        for token in sorted(vocab, key=vocab.get):
            if vocab[token] < limit and token not in out_vocab:
                out_vocab[token] = len(out_vocab)
        for index, info in sorted(tok.added_tokens_decoder.items()):
            if index < limit and info.content not in out_added:
                out_added[info.content] = info
    res = _copy(base_tok)
    base_vocab = base_tok.get_vocab()
    for token in out_vocab:
        if token not in out_added and token not in base_vocab:
            res.add_tokens(token)
    for info in out_added.values():
        res.add_tokens(info)
    return res


# ---------------------------------------------------------------------------
# Rows in the output vocabulary


@dataclass(frozen=True)
class _Default:
    """Where one token's default row comes from: ("zero",), ("row", model, old id) or
    ("mean", models that have it)."""

    kind: str
    model: Optional[str] = None
    index: int = -1
    models: tuple = ()


class Alignment:
    """The plan of every vocabulary tensor, checked at construction (ConfigError), and the
    aligned matrices on demand.

    inputs: tensor name -> (the models mergekit gathers for it, in its order; the base
    model of that tensor's slice or None)."""

    def __init__(self, vocabulary: Vocabulary, settings: dict, infos: dict, axes: dict, inputs: dict,
                 base: Optional[str]):
        self.vocabulary = vocabulary
        self.settings = settings
        self.base = base
        self.infos = infos  # unaligned, for reading the rows that defaults come from
        self.axes = axes
        self.inputs = inputs
        self.forced = np.zeros(vocabulary.tokens, dtype=bool)
        for token, cfg in settings["tokens"].items():
            if cfg["force"]:
                self.forced[vocabulary.vocab[token]] = True
        self.defaults = {name: self._plan(name, settings["tokens"]) for name in axes}
        self._rows: dict = {}  # (name, dtype) -> (ids, rows)

    def identity(self) -> bool:
        """Whether every model's matrices already are in the output vocabulary."""
        return not self.forced.any() and all(
            self.vocabulary.keeps(ref, info.tensors[name].shape[axis])
            for ref, info in self.infos.items() for name, axis in self.axes.items())

    def shape(self, name: str, shape: tuple) -> tuple:
        axis = self.axes[name]
        return (*shape[:axis], self.vocabulary.size, *shape[axis + 1:])

    def _plan(self, name: str, configs: dict) -> dict:
        models, base = self.inputs[name]
        perms = self.vocabulary.permutations
        has = np.stack([perms[m] >= 0 for m in models])
        plan = {}
        for new_id in np.flatnonzero(~has.all(axis=0) | self.forced).tolist():
            token = self.vocabulary.by_id[new_id]
            cfg = configs.get(token)
            if cfg is not None:
                plan[new_id] = self._configured(cfg["source"], name, token, new_id, models)
                continue
            owners = tuple(m for m, p in zip(models, has[:, new_id]) if p)
            if len(owners) == 1:
                plan[new_id] = _Default("row", owners[0], int(perms[owners[0]][new_id]))
            elif not owners:
                LOG.warning("token %r is in no model: its rows are zero", token)
                plan[new_id] = _Default("zero")
            elif base in models and perms[base][new_id] >= 0:
                plan[new_id] = _Default("row", base, int(perms[base][new_id]))
            else:
                plan[new_id] = _Default("mean", models=owners)
        return plan

    def _configured(self, source, name: str, token: str, new_id: int, models) -> _Default:
        where = f"token {token!r} of {name}"
        if source is None:
            raise ConfigError(f"tokens: {where} needs a default row and its entry gives no source: give source "
                              "(a model, {kind: zero} or {kind: model_token, ...})")
        if source["kind"] == "zero":
            return _Default("zero")
        model = source["model"]
        if model not in models:
            raise ConfigError(f"tokens: {where} takes its row from {model}, which is not an input of that tensor: "
                              f"use one of {', '.join(models)}")
        if source["kind"] == "model":
            old = int(self.vocabulary.permutations[model][new_id])
            if old < 0:
                raise ConfigError(f"tokens: {where} takes its row from {model}, which lacks that token: use "
                                  "{kind: model_token, model: ..., token_id: ...} or another model")
            return _Default("row", model, old)
        index = source["token_id"]
        if index is None:
            original = self.vocabulary.original.get(model, {})
            if source["token"] not in original:
                raise ConfigError(f"tokens: {where} takes the row of {source['token']!r}, which {model}'s tokenizer "
                                  "lacks: name a token it has, or give token_id")
            index = original[source["token"]]
        rows = self.infos[model].tensors[name].shape[self.axes[name]]
        if not 0 <= index < rows:
            raise ConfigError(f"tokens: {where} takes row {index} of {model}, which has {rows}: give a token id "
                              f"below {rows}")
        return _Default("row", model, int(index))

    # -- tensors -----------------------------------------------------------------

    def _default_rows(self, name: str, dtype):
        """The default rows of one tensor in `dtype`: (output ids, rows [k, ...])."""
        import torch

        key = (name, dtype)
        if key in self._rows:
            return self._rows[key]
        from hotmerge.models.folder import iter_tensors

        plan = self.defaults[name]
        axis = self.axes[name]
        needed = {d.model for d in plan.values() if d.kind == "row"} | {m for d in plan.values() for m in d.models}
        raw = {m: next(iter_tensors(self.infos[m], [name], dtype=dtype))[1].movedim(axis, 0) for m in needed}
        shape = next(iter(self.infos.values())).tensors[name].shape
        row_shape = (*shape[:axis], *shape[axis + 1:])
        ids = sorted(plan)
        rows = torch.zeros((len(ids), *row_shape), dtype=dtype)
        perms = self.vocabulary.permutations
        for k, new_id in enumerate(ids):
            d = plan[new_id]
            if d.kind == "row":
                rows[k] = raw[d.model][d.index]
            elif d.kind == "mean":
                # as mergekit: summed in the merge dtype, model by model, then divided
                acc = torch.zeros(row_shape, dtype=dtype)
                for m in d.models:
                    acc = acc + raw[m][int(perms[m][new_id])]
                acc /= len(d.models)
                rows[k] = acc
        out = (torch.tensor(ids, dtype=torch.long), rows)
        self._rows[key] = out
        return out

    def align(self, ref: str, name: str, tensor):
        """One model's matrix `name` (its own rows, in the merge dtype) in the output vocabulary."""
        import torch

        axis = self.axes[name]
        old = tensor.movedim(axis, 0)
        vocab = self.vocabulary
        p = torch.from_numpy(vocab.permutations[ref])
        keep = (p >= 0) & ~torch.from_numpy(self.forced)
        new = torch.zeros((vocab.size, *old.shape[1:]), dtype=tensor.dtype)
        new[:vocab.tokens][keep] = old[p[keep]]
        ids, rows = self._default_rows(name, tensor.dtype)
        if len(ids):
            lacks = ~keep[ids]
            new[ids[lacks]] = rows[lacks]
        if vocab.size > vocab.tokens:
            # mergekit: padding rows are the mean of the model's aligned rows
            new[vocab.tokens:] = torch.mean(new[:vocab.tokens], dim=0)
        return new.movedim(0, axis)


def inputs_of_genome(models: list, base: Optional[str]) -> tuple:
    """What mergekit gathers for every tensor of a genome's merge config: the models in
    order, then the base when it is not one of them."""
    return (*models, *([base] if base is not None and base not in models else [])), base


def align_models(settings: dict, infos: dict, base: Optional[str], inputs_of) -> tuple[Vocabulary, dict]:
    """The output vocabulary, and `infos` (model reference -> ModelInfo, the base among them)
    as they read in it: each vocabulary tensor's shape in the output vocabulary, and
    iter_tensors handing out aligned matrices. inputs_of(tensor name) -> (the models
    mergekit gathers for that tensor, in order; its base model or None)."""
    from dataclasses import replace

    vocabulary = build(settings, infos, base)
    reference = infos[base] if base is not None else next(iter(infos.values()))
    axes = vocabulary_axes(reference)
    alignment = Alignment(vocabulary, settings, infos, axes, {name: inputs_of(name) for name in axes}, base)
    if alignment.identity():
        return vocabulary, dict(infos)
    out = {}
    for ref, info in infos.items():
        tensors = dict(info.tensors)
        for name in axes:
            tensors[name] = replace(tensors[name], shape=alignment.shape(name, tensors[name].shape))
        config = dict(info.config)
        config["vocab_size"] = vocabulary.size
        out[ref] = replace(info, tensors=tensors, config=config, vocabulary=alignment)
    return vocabulary, out


def fit_vocabulary(model, validated) -> None:
    """A transformers model of the reference, in the output vocabulary: its embedding and
    output matrices resized (and config.vocab_size with them; tied ones stay tied),
    holding the reference's aligned rows."""
    from hotmerge.models.folder import iter_tensors

    alignment = validated.reference.vocabulary
    if alignment is None:
        return
    model.resize_token_embeddings(alignment.vocabulary.size, mean_resizing=False)
    params = dict(model.named_parameters())
    names = [name for name in alignment.axes if name in params]
    for name, tensor in iter_tensors(validated.reference, names, dtype=params[names[0]].dtype):
        params[name].data.copy_(tensor)


def alignment_spec(info) -> Optional[dict]:
    """What rebuilds a model's alignment in another process (vLLM's worker), as plain types."""
    alignment = info.vocabulary
    if alignment is None:
        return None
    return {"settings": alignment.settings, "models": list(alignment.infos), "base": alignment.base,
            "inputs": {name: [list(models), base] for name, (models, base) in alignment.inputs.items()}}


def models_from_spec(spec: dict) -> dict:
    """The models of alignment_spec's output, as they read in the output vocabulary
    (model reference -> ModelInfo); the same build, so the same rows."""
    from hotmerge.models.folder import ModelInfo

    infos = {ref: ModelInfo.from_path(ref) for ref in spec["models"]}
    inputs = {name: (tuple(models), base) for name, (models, base) in spec["inputs"].items()}
    return align_models(spec["settings"], infos, spec["base"], lambda name: inputs[name])[1]
