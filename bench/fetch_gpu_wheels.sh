#!/usr/bin/env bash
# Download the wheels bench/gpu_check.sh needs on a GPU machine that has torch, triton,
# transformers (and pyarrow, pandas, scipy, pytest, rich, typer, pyyaml) but no network.
# Run here, in the repository root; the wheels land in .whl/ (git-ignored), which the
# device call carries.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
PY=${PYTHON:-python3}
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any)
WHEELS=(lm-eval==0.4.13 cma==4.5.0 datasets evaluate dill multiprocess more_itertools pytablewriter
        DataProperty mbstrdecoder pathvalidate tabledata tcolorpy typepy chardet pydantic pydantic-core
        annotated-types typing-inspection jsonlines)
# Published as source only; pure Python, so a wheel built here installs there.
SOURCE_ONLY=(sqlitedict word2number)
"$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]}" -d .whl "${WHEELS[@]}"
"$PY" -m pip wheel --no-deps -w .whl "${SOURCE_ONLY[@]}"
du -sh .whl
