"""The load-time statistics (stats.py), kept on disk so that a resumed or repeated run
loads them instead of making another pass over every source.

One file per entry in the cache folder (`hotmerge evolve`: <storage-path>/.stats-cache;
other commands keep no cache), named by the digest of its key:

    <digest>.safetensors   the statistics as plain arrays (never a pickle), with the
                           key itself in the header's metadata

The key is everything the statistics depend on:
  * the sources, as the runtime describes them (models.folder.sources_identity: every
    file of each model folder by size, mtime_ns and inode, the vocabulary alignment;
    the vLLM runtime adds vLLM's version and the tensor-parallel rank and size),
  * the layout: dtype, number of models, whether there is a base, every segment
    (name, offset, numel, row_len, elem_offset, elem_cols, elem_stride),
  * what is computed: della's rank codes, slerp's constants (no other method
    parameter enters the statistics: densities and weights are applied per candidate),
  * the code: STATS_FORMAT, the hotmerge version and a digest of the code that computes
    them (stats.py, reference.py), the torch version, the device, and on the CPU its
    vector ISA and thread count (they decide how a float64 sum is split, so its last bit).

An entry is never trusted: one that does not parse, holds another key, or lacks an
array of the expected dtype and shape is recomputed and rewritten, with one log line.
Writes go to a temporary file in the folder, renamed into place, so a reader never
sees half an entry and ranks writing the same entry at once are harmless.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from . import reference as R
from .stats import MagnitudeHistogram, SourceStats

STATS_FORMAT = 2  # bump when the statistics' meaning or arrays change

LOG = logging.getLogger(__name__)

_folder: Optional[Path] = None


def use_folder(folder) -> None:
    """Cache the statistics of the runtimes started from now on in this process in `folder`
    (None: no cache). `hotmerge evolve` sets <storage-path>/.stats-cache before its runtime starts."""
    global _folder
    _folder = Path(folder) if folder is not None else None


def folder() -> Optional[Path]:
    """The folder use_folder set, or None."""
    return _folder


def _code_digest() -> str:
    """Digest of the code that computes the statistics: a change there is a new key even
    where nobody bumped STATS_FORMAT."""
    h = hashlib.sha256()
    for module in ("stats.py", "reference.py"):
        try:
            h.update((Path(__file__).parent / module).read_bytes())
        except OSError:
            h.update(module.encode())
    return h.hexdigest()[:16]


def _device(device: torch.device) -> dict:
    if device.type == "cuda":
        return {"type": "cuda", "name": torch.cuda.get_device_name(device)}
    if device.type == "cpu":
        return {"type": "cpu", "isa": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads()}
    return {"type": device.type}


class StatsCache:
    """The statistics of one FlatSources, loaded from or saved to `folder` under a key
    made of `sources` (the caller's description of what filled the buffers) and the rest
    listed in the module docstring. FlatSources.ensure_stats uses it when one is attached."""

    def __init__(self, folder, sources: dict):
        self.folder = Path(folder)
        self.sources = sources
        self.loaded = False  # whether the last load found a usable entry

    def key(self, flat, della: bool, slerp: bool) -> dict:
        from hotmerge import __version__

        layout = hashlib.sha256(json.dumps(
            [[s.name, s.offset, s.numel, s.row_len, s.elem_offset, s.elem_cols, s.elem_stride]
             for s in flat.segments]).encode())
        return {
            "format": STATS_FORMAT, "hotmerge": __version__, "code": _code_digest(), "torch": torch.__version__,
            "device": _device(flat.stream_device or flat.device), "dtype": str(flat.dtype).removeprefix("torch."),
            "models": flat.n_models, "base": flat.base is not None, "total": flat.total,
            "segments": layout.hexdigest(), "della": bool(della), "slerp": bool(slerp),
            "sources": self.sources,
        }

    def path(self, key: dict) -> Path:
        return self.folder / f"{hashlib.sha256(_text(key).encode()).hexdigest()[:32]}.safetensors"

    def load(self, flat, della: bool, slerp: bool) -> Optional[SourceStats]:
        """The cached statistics of flat, or None (absent, or refused with one log line)."""
        key = self.key(flat, della, slerp)
        path = self.path(key)
        self.loaded = False
        if not path.is_file():
            return None
        try:
            stats = _read(path, key, flat, della, slerp)
        except Exception as error:  # whatever is wrong with the file, the cure is to recompute
            LOG.warning("statistics cache entry %s is unusable (%s): recomputing it", path,
                        " ".join(str(error).split())[:200] or type(error).__name__)
            return None
        self.loaded = True
        return stats

    def save(self, flat, della: bool, slerp: bool) -> None:
        """Write flat.stats (computed with these flags) under its key. A folder that cannot
        be written costs the cache, never the run (one log line). No fsync: an entry that a
        crash loses or tears is recomputed."""
        from safetensors import SafetensorError
        from safetensors.numpy import save_file

        key = self.key(flat, della, slerp)
        path = self.path(key)
        tmp = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
            os.close(fd)
            save_file(_arrays(flat.stats), tmp, metadata={"key": _text(key)})
            os.replace(tmp, path)
        except (OSError, SafetensorError) as error:
            LOG.warning("could not write the statistics cache entry %s (%s)", path, error)
        finally:
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)


def _text(key: dict) -> str:
    return json.dumps(key, sort_keys=True, default=str)


def _arrays(st: SourceStats) -> dict:
    """SourceStats as named plain arrays; the histograms concatenated, with offsets."""
    out = {"max_source": st.max_source}
    if st.hist is not None:
        hists = [h for row in st.hist for h in row]
        out.update(max_base=st.max_base, max_delta=st.max_delta, l1=st.l1,
                   hist_offsets=np.cumsum([0] + [len(h.keys) for h in hists]).astype(np.int64),
                   hist_keys=_cat([h.keys for h in hists], np.int64),
                   hist_cum=_cat([h.cum for h in hists], np.int64),
                   hist_cum_l1=_cat([h.cum_l1 for h in hists], np.float64))
    if st.norms is not None:
        out.update(norms=st.norms, dots=st.dots)
    if st.delta_dots is not None:
        out["delta_dots"] = st.delta_dots
    if st.rank_codes is not None:
        out["rank_codes"] = st.rank_codes.cpu().numpy()
    return {name: np.ascontiguousarray(a) for name, a in out.items()}


def _cat(parts, dtype) -> np.ndarray:
    return np.concatenate(parts).astype(dtype, copy=False) if parts else np.zeros(0, dtype)


def _read(path: Path, key: dict, flat, della: bool, slerp: bool) -> SourceStats:
    """The entry at path as SourceStats; raises ValueError where it is not what key promises."""
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        if (f.metadata() or {}).get("key") != _text(key):
            raise ValueError("it was written for another key")
        a = {name: f.get_tensor(name) for name in f.keys()}
    S, M, has_base = len(flat.segments), flat.n_models, flat.base is not None
    f64, i64 = np.dtype(np.float64), np.dtype(np.int64)
    expect = {"max_source": (f64, (S, M))}
    if has_base:
        expect.update(max_base=(f64, (S,)), max_delta=(f64, (S, M)), l1=(f64, (S, M)),
                      hist_offsets=(i64, (S * M + 1,)), hist_keys=(i64, None), hist_cum=(i64, None),
                      hist_cum_l1=(f64, None))
    if slerp:
        expect.update(norms=(f64, (S, M)), dots=(f64, (S, M, M)))
        if has_base:
            expect["delta_dots"] = (f64, (S, M, M))
    if della:
        expect["rank_codes"] = (np.dtype(np.uint8), (M, flat.total))
    if set(a) != set(expect):
        raise ValueError(f"it holds {sorted(a)}, not {sorted(expect)}")
    for name, (dtype, shape) in expect.items():
        if a[name].dtype != dtype or (shape is not None and a[name].shape != shape):
            raise ValueError(f"{name} is {a[name].dtype} {a[name].shape}, not {dtype} {shape}")
    st = SourceStats(max_source=a["max_source"])
    if has_base:
        st.max_base, st.max_delta, st.l1 = a["max_base"], a["max_delta"], a["l1"]
        st.hist = _histograms(a, flat)
    if slerp:
        st.norms, st.dots = a["norms"], a["dots"]
        st.delta_dots = a.get("delta_dots")
    if della:
        st.rank_codes = torch.from_numpy(a["rank_codes"]).to(flat.device)
    return st


def _histograms(a: dict, flat) -> list:
    """The [S][M] histograms, each checked to count exactly its segment's elements."""
    keys, cum, cum_l1, offsets = a["hist_keys"], a["hist_cum"], a["hist_cum_l1"], a["hist_offsets"]
    n = len(keys)
    if len(cum) != n or len(cum_l1) != n or offsets[0] != 0 or offsets[-1] != n or (np.diff(offsets) < 0).any():
        raise ValueError("the histograms' arrays disagree in length")
    out, i = [], 0
    for seg in flat.segments:
        row = []
        for _ in range(flat.n_models):
            lo, hi = int(offsets[i]), int(offsets[i + 1])
            i += 1
            h = MagnitudeHistogram(keys=keys[lo:hi], cum=cum[lo:hi], cum_l1=cum_l1[lo:hi])
            if h.n != seg.numel or (len(h.keys) and (h.keys[0] < 0 or h.keys[-1] > R.KEY_MAX)):
                raise ValueError(f"the histogram of segment {seg.name!r} does not count its {seg.numel} elements")
            row.append(h)
        out.append(row)
    return out
