#!/usr/bin/env bash
# benchmarks/gpu_check.py on a CUDA machine, with the wheels and tokenizer of .gpu_bundle/ (gpu_bundle.sh)
# when present; JSON on stdout and, with OUT set, in $OUT/gpu_check.json. Extra arguments go to the script.
cd "$(dirname "$0")/.." && if [ -d .gpu_bundle/whl ]; then python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/gpu_site .gpu_bundle/whl/*.whl && export PYTHONPATH=/tmp/gpu_site${PYTHONPATH:+:$PYTHONPATH}; fi; PYTHONUNBUFFERED=1 exec python3 benchmarks/gpu_check.py --device cuda ${OUT:+--out "$OUT"} $([ -d .gpu_bundle/tokenizer ] && echo --tokenizer .gpu_bundle/tokenizer) "$@"
