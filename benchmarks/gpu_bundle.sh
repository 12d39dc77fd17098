#!/usr/bin/env bash
# What benchmarks/gpu_check.py needs on a GPU machine that has torch, transformers, pyarrow and numpy but
# no network: curate's other run-time wheels (for Python 3.12, x86-64) and the embedded model's tokenizer
# with its chat template. Writes .gpu_bundle/ (git-ignored; about 7 MiB), used by gpu_check.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
rm -rf .gpu_bundle && mkdir -p .gpu_bundle/whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .gpu_bundle/whl \
  dask==2026.8.0 distributed==2026.8.0 partd locket tblib zict tornado \
  jsonschema jsonschema-specifications referencing rpds-py opacus
"$PY" - <<'PYEOF'
from curate import models
models.load_tokenizer(models.resolve(None)).save_pretrained(".gpu_bundle/tokenizer")
PYEOF
du -sh .gpu_bundle
