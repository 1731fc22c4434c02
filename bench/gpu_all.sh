#!/usr/bin/env bash
# All GPU checks and timings in one run, for a lent GPU machine with torch and triton but no network:
#   bash bench/gpu_all.sh [OUTDIR]
# Optional comparison wheels (liger-kernel, cut-cross-entropy) are installed from .whl/ when present. The C++
# extension is built when the machine can (scikit-build-core); otherwise the Python package is used from the
# source tree, which is all the GPU scripts need.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-/tmp/fastsft-bench}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/fastsft-site \
    .whl/*.whl && export PYTHONPATH=/tmp/fastsft-site${PYTHONPATH:+:$PYTHONPATH}
fi
if ! python3 -m pip install -q --no-build-isolation --no-deps -e . >"$out/install.log" 2>&1; then
  echo "editable install failed (see install.log); using the source tree"
  [ -e fastsft/kernels ] || ln -s ../kernels fastsft/kernels
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv,noheader
python3 bench/gpu_kernels.py --json "$out/kernels.json" 2>&1 | tee "$out/kernels.log"
python3 bench/gpu_model.py 2>&1 | tee "$out/model.log"
python3 bench/gpu_attention.py --json "$out/attention.json" 2>&1 | tee "$out/attention.log"
if python3 -c "import pytest_benchmark" 2>/dev/null; then
  python3 -m pytest bench --benchmark-only -q -p no:cacheprovider --bench-rows "$out/bench_rows.json" \
    --benchmark-json "$out/benchmark.json" 2>&1 | tee "$out/bench_suite.log"
else
  echo "pytest-benchmark not installed: the bench suite (python -m pytest bench --benchmark-only) is skipped"
fi
