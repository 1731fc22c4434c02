#!/usr/bin/env bash
# Every GPU check of a session in named parts, on a lent GPU machine (no network):
#   bash bench/gpu_session.sh check step train eval
#   check: the GPU test set (python -m pytest -m gpu tests) and bench/gpu_attention.py (FA4 through the custom op)
#   step:  bench/step.py at d12 (32x2048) and d20 (16x2048) beside nanochat's step (needs .peer/)
#   train: nanochat's d20 step (with .peer/), then fastsft train --config d20.toml (300 steps, random init, synthetic chat)
#   eval:  bench/gpu_eval.py (MMLU / ARC-Easy problems per second of a d20-size model)
# flash-attn-4, when wanted, is installed before (../shared/tools/fa4_wheels.sh says how) and on PYTHONPATH; if its
# attention tests fail, the step and train parts pin torch's varlen attention instead, and say so.
# Logs and JSON rows go to $OUT (or /tmp/fastsft-gpu); short tables are printed last.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/fastsft-gpu}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTORCH_ALLOC_CONF=expandable_segments:True
if ! python3 -c "import fastsft._C" 2>/dev/null; then
  python3 -m pip install -q --no-build-isolation --no-deps -e . >"$out/install.log" 2>&1 || { tail -20 "$out/install.log"; exit 1; }
fi
python3 -c "import torch, triton; print(torch.cuda.get_device_name(), 'torch', torch.__version__, 'triton', triton.__version__)"
python3 -c "from fastsft.attention import available_backends; print('attention backends:', available_backends('cuda'))"
for part in "$@"; do
  echo "== $part"
  case $part in
    check)
      python3 -m pytest -q -p no:cacheprovider -m gpu tests 2>&1 | tee "$out/gpu_tests.log" | tail -12
      if grep -q "flash_attn_4.*FAILED\|FAILED.*flash_attn_4" "$out/gpu_tests.log"; then
        echo "flash_attn_4 failed its tests: the step and train parts use torch_varlen"
        export FASTSFT_ATTENTION=torch_varlen
      fi
      python3 bench/gpu_attention.py --json "$out/attention.json" 2>&1 | tee "$out/attention.log" | tail -30
      ;;
    step)
      for shape in "12 32" "20 16"; do
        read -r depth batch <<<"$shape"
        python3 bench/step.py --depth "$depth" --batch "$batch" --peer --json "$out/step.jsonl" 2>&1 \
          | tee "$out/step_d$depth.log" | tail -6
      done
      ;;
    train)
      if [ -f .peer/nanochat_sft_bench.py ]; then  # the peer's d20 step in the same command, for the side-by-side
        python3 .peer/nanochat_sft_bench.py --depth 20 --batch 16 2>&1 | tee "$out/peer_d20.log" | tail -5
      fi
      python3 -m fastsft.train --config d20.toml --out_dir=/tmp/d20 --log_every=25 2>&1 | tee "$out/d20_train.log" \
        | grep -v "^  " | tail -40
      cp /tmp/d20/summary.json /tmp/d20/metrics.jsonl /tmp/d20/report.md "$out/" 2>/dev/null
      ;;
    eval)
      python3 bench/gpu_eval.py --json "$out/eval.json" 2>&1 | tee "$out/eval.log" | tail -15
      ;;
    *) echo "unknown part $part" ;;
  esac
done
