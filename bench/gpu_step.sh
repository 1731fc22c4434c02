#!/usr/bin/env bash
# The driver's step against nanochat's, and a d20 training run, on a GPU machine in one command:
#   bash bench/gpu_step.sh [step|train|all]     (needs .peer/ for the side-by-side: see ../shared/peer/README.md)
# Full logs and JSON rows go to $OUT (or /tmp/fastsft-step); the short table is printed last.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/fastsft-step}
mkdir -p "$out"
what=${1:-all}
export PYTHONUNBUFFERED=1 PYTORCH_ALLOC_CONF=expandable_segments:True
if ! python3 -c "import fastsft._C" 2>/dev/null; then
  python3 -m pip install -q --no-build-isolation --no-deps -e . >"$out/install.log" 2>&1 || { tail -20 "$out/install.log"; exit 1; }
fi
python3 -c "import torch, triton; print(torch.cuda.get_device_name(), 'torch', torch.__version__, 'triton', triton.__version__)"
if [ "$what" = step ] || [ "$what" = all ]; then
  python3 bench/step.py --depth 12 --batch 32 --peer --json "$out/step.jsonl" 2>&1 | tee "$out/step_d12.log" | tail -6
  python3 bench/step.py --depth 20 --batch 16 --peer --json "$out/step.jsonl" 2>&1 | tee "$out/step_d20.log" | tail -6
fi
if [ "$what" = train ] || [ "$what" = all ]; then
  python3 -m fastsft.train --config d20.toml --out_dir=/tmp/d20 --log_every=25 2>&1 | tee "$out/d20_train.log" | grep -v "^  "
  cp /tmp/d20/summary.json /tmp/d20/metrics.jsonl /tmp/d20/report.md "$out/" 2>/dev/null
fi
