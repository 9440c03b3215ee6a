"""mergekit's functional merge methods on a real model: `hotmerge export` against
mergekit-yaml's merge of the same merge config, on the smol family (SmolLM2-135M-Instruct and
its three fine-tuned experts), tensor by tensor within bf16 rounding (tests/parity.py, the
rule the toy family's tests use). Too slow for the suite (a model's merge twice per case);
the cases are tests/test_merge_configs.py's, on the smol family's folders.

    .venv/bin/hotmerge toy build --family smol .cache/smol
    .venv/bin/python bench/parity_smol.py --family .cache/smol --out bench/results/parity_smol.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

FUNCTIONAL = ["model_stock", "model_stock-filter_wise", "nuslerp-base", "nuslerp-base-row_wise", "nuslerp-per-row-base",
              "nuslerp-per-column-no-base", "nuslerp-no-base", "multislerp-base",
              "multislerp-no-base-unnormalized", "karcher", "nearswap-gradient", "sce-default",
              "sce-select-gradient", "ram", "ramplus_tl", "arcee_fusion"]


def check(name: str, base: str, experts: list[str], scratch: Path) -> dict:
    """One case: equal, refused by both (the same kind of error), or a difference."""
    from parity import assert_equal_to_mergekit, folder_tensors
    from test_merge_configs import _cases, _mergekit

    from hotmerge.config.merge import read_merge_config
    from hotmerge.run.export import export_merge

    config = _cases(base, experts)[name]
    started = time.perf_counter()
    ours = theirs = None
    try:
        validated, recipe = read_merge_config(config)
        ours = folder_tensors(export_merge(validated, recipe, scratch / "ours"))
    except Exception as error:  # noqa: BLE001 - compared with mergekit's own outcome below
        ours = error
    try:
        _mergekit(config, scratch / "mergekit")
        theirs = folder_tensors(scratch / "mergekit")
    except Exception as error:  # noqa: BLE001
        theirs = error
    row = {"case": name, "seconds": round(time.perf_counter() - started, 1)}
    if isinstance(ours, Exception) or isinstance(theirs, Exception):
        both = isinstance(ours, Exception) and isinstance(theirs, Exception)
        # mergekit raises ValueError where a method is undefined; hotmerge its UndefinedMergeError
        refused = both and isinstance(ours, ValueError) and isinstance(theirs, ValueError)
        row["outcome"] = "refused by both" if refused else "differs"
        row["hotmerge"] = repr(ours)[:300] if isinstance(ours, Exception) else "merged"
        row["mergekit"] = repr(theirs)[:300] if isinstance(theirs, Exception) else "merged"
        return row
    try:
        assert set(ours) <= set(theirs), sorted(set(ours) - set(theirs))
        assert_equal_to_mergekit(recipe, ours, theirs)
        row["outcome"] = "equal"
    except AssertionError as error:
        row["outcome"] = "differs"
        row["detail"] = str(error)[:300]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default=".cache/smol", help="a family folder (base and expert_* inside)")
    parser.add_argument("--cases", nargs="+", default=FUNCTIONAL, choices=FUNCTIONAL)
    parser.add_argument("--out", default="bench/results/parity_smol.json")
    args = parser.parse_args()
    family = Path(args.family).absolute()
    base = str(family / "base")
    experts = sorted(str(p) for p in family.iterdir() if p.name.startswith("expert_"))
    rows = []
    for name in args.cases:
        with tempfile.TemporaryDirectory() as scratch:
            rows.append(check(name, base, experts, Path(scratch)))
        print(json.dumps(rows[-1]), flush=True)
    Path(args.out).write_text(json.dumps({"family": args.family, "cases": rows}, indent=2) + "\n")
    if any(r["outcome"] == "differs" for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
