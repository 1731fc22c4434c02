#!/usr/bin/env bash
# Every GPU check of a session in named parts, on a lent GPU machine (no network):
#   bash bench/gpu_session.sh check suite step20 step12 plain20 micro micro12 budget keepmlp keepmlp12 fp8_20 fp8_12
#                             fp8budget base variants variant:NAME knob:KEY=VALUE at12 fp8test mempeak train
#                             peerprof12 eval fp8scaling hostcost bundle
#   check:   the GPU test set (python -m pytest -m gpu tests) and bench/gpu_attention.py (FA4 through the custom op)
#   suite:   the benchmark suite, python -m pytest bench --benchmark-only (kernels against references, the step)
#   step20:  bench/step.py at d20 (16x2048) beside nanochat's step (needs .peer/), both sides profiled (GPU time
#            by kernel family), the memory split, and the seed recipe
#   step12:  the same at d12 (32x2048), fastsft's side profiled (nanochat's: peerprof12), and where its GPU
#            waits (bench/trace_gaps.py)
#   plain20: the d20 step alone (fastsft side only), the baseline of budget / keepmlp / micro in one call
#   micro:   the d20 step as 4 micro-batches of 4 rows (fastsft side only): the memory the step needs at the
#            cost it has; micro12: the d12 step as 2 micro-batches of 16
#   budget:  the d20 step with activation_memory_budget = 0.5 (the compiled backward recomputes)
#   keepmlp: the d20 step with recompute_mlp = false (the MLP keeps relu^2's output too); keepmlp12: at d12
#   fp8_20, fp8_12: the d20 / d12 step with fp8 = true (the blocks' projections in fp8), profiled, beside
#            nanochat's step (fp8_20 with the seed recipe too), and its host time by phase (bench/trace_gaps.py);
#            fp8budget: fp8 at d20 with
#            activation_memory_budget = 0.5;
#   base:    the d20 fp8 step of this checkout as the variants run it (profiled, --memory-peak, where its GPU
#            waits by bench/trace_gaps.py, its 12 slowest compiled kernels' code by bench/kernel_sources.py),
#            their baseline
#   variants: the d20 fp8 step once per folder .variants/NAME/ (variant:NAME: that folder only), whose files
#            (at their repository paths) are put in place for that step and taken back after it: other commits'
#            code beside this one's in one command (git show BRANCH:fastsft/fp8.py > .variants/NAME/fastsft/fp8.py;
#            the folder is ignored, so carry it); a variant's own files under tests/gpu/ run first
#   knob:KEY=VALUE: the base step with that inductor setting (bench/step.py --inductor KEY=VALUE), read as base
#   at12:    the base, variant and knob parts after it run the d12 fp8 step (32x2048) instead of d20's: where the
#            step is host-bound (bench/RESULTS.md, run 13); their logs and files are named *_d12
#   fp8test: the fp8 and memory_peak GPU tests, and the loss compiling nothing again for a new row count
#   mempeak: what is alive at the d20 step's memory peak (bench/step.py --memory-peak), fp8 with
#            activation_memory_budget = 0.5 and fp8 alone
#   train:   nanochat's d20 step (unless step20 ran in this command), then fastsft train --config d20.toml
#            (300 steps, random init, synthetic chat)
#   peerprof12: nanochat's d12 step profiled (bench/peer_profile.py)
#   eval:    bench/gpu_eval.py (MMLU / ARC-Easy problems per second of a d20-size model)
#   fp8scaling: bench/gpu_fp8_scaling.py (each projection's matmuls with tensorwise fp8 scales, with or without
#            fast accumulation, or blockwise scales, and one quantization each way): whether blockwise scales, whose
#            casts need no pass for the maximum, or fast accumulation pay
#   hostcost: bench/gpu_host_cost.py at d12 and d20 (each op the fp8 step launches a layer, and the optimizer step:
#            host time a call beside GPU time): which launches make the step host-bound
#   bundle:  (last) the logs (*.log, *.json) and folders this command wrote moved into $out/bundle.tgz; the step
#            rows (step.jsonl) and other files stay: for transfers that bring back only a few files (a session of
#            variants writes dozens, and such a transfer may leave out the step rows)
# flash-attn-4, when wanted, is installed before (../shared/tools/fa4_wheels.sh says how) and on PYTHONPATH; if its
# attention tests fail, the later parts pin torch's varlen attention instead, and say so.
# Logs and JSON rows go to $OUT (or /tmp/fastsft-gpu); short tables are printed last.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/fastsft-gpu}
mkdir -p "$out"
started=$(mktemp)  # its time: what this command wrote in $out is newer (the bundle part)
trap 'rm -f "$started" "$started.list"' EXIT
export PYTHONUNBUFFERED=1 PYTORCH_ALLOC_CONF=expandable_segments:True
if ! python3 -c "import fastsft._C" 2>/dev/null; then
  python3 -m pip install -q --no-build-isolation --no-deps -e . >"$out/install.log" 2>&1 || { tail -20 "$out/install.log"; exit 1; }
fi
python3 -c "import torch, triton; print(torch.cuda.get_device_name(), 'torch', torch.__version__, 'triton', triton.__version__)"
python3 -c "from fastsft.attention import available_backends; print('attention backends:', available_backends('cuda'))"
short() { grep -v "^  .* ms  x\|UserWarning\|_warn_once\|exe_args" | tail -"$1"; }
# One bench/step.py run: step LOG=name [TIMEOUT=s] [TAIL=lines] step.py-arguments...; rows to step.jsonl.
step() {
  local log="" limit=200 tail=4
  while [[ $1 == *=* && $1 != --* ]]; do
    case $1 in LOG=*) log=${1#LOG=} ;; TIMEOUT=*) limit=${1#TIMEOUT=} ;; TAIL=*) tail=${1#TAIL=} ;; esac
    shift
  done
  timeout "$limit" python3 bench/step.py "$@" --json "$out/step.jsonl" 2>&1 | tee "$out/step_$log.log" | short "$tail"
}
peer_d20_ran=
# where the profiled fastsft steps waited, to $out/gaps_NAME.log; printed: the idle time, the per-phase table and
# the forward's and backward's 5 costliest host ops (the log has 25 a phase)
phases() {
  python3 bench/trace_gaps.py /tmp/fastsft-step-bench/profile_trace.json --top 6 --host-top 25 \
    >"$out/gaps_$1.log" 2>&1
  head -1 "$out/gaps_$1.log"
  grep -A7 "^per phase" "$out/gaps_$1.log"
  grep -h -A5 "^host self time in \(forward\|backward\)" "$out/gaps_$1.log" | cut -c1-120
}
# base, each variant and each knob: the d20 fp8 step, profiled, with what is alive at its memory peak, and where
# its GPU waits. variant_step NAME LABEL TIMEOUT [step.py-arguments...]
variant_shape=(--depth 20 --batch 16); variant_suffix=""
variant_step() {
  local name=$1$variant_suffix label=$2$variant_suffix limit=$3 log="d${variant_shape[1]}_fp8_$1"
  shift 3
  step LOG="$log" TIMEOUT="$limit" TAIL=70 "${variant_shape[@]}" --override=--fp8=true --profile 3 --top 40 \
    --memory-peak 16 --label "$label" "$@"
  phases "$name"
  # the slowest compiled kernels' code: the cache that holds it goes with the machine
  python3 bench/kernel_sources.py "$out/step.jsonl" "$out/kernels_$name" --top 12 >"$out/kernels_$name.log" 2>&1
}
for part in "$@"; do
  echo "== $part $(date -u +%H:%M:%S)"
  case $part in
    check)
      python3 -m pytest -q -p no:cacheprovider -m gpu tests 2>&1 | tee "$out/gpu_tests.log" | tail -12
      if grep -q "flash_attn_4.*FAILED\|FAILED.*flash_attn_4" "$out/gpu_tests.log"; then
        echo "flash_attn_4 failed its tests: the later parts use torch_varlen"
        export FASTSFT_ATTENTION=torch_varlen
      fi
      python3 bench/gpu_attention.py --json "$out/attention.json" 2>&1 | tee "$out/attention.log" | tail -30
      ;;
    suite)
      python3 -m pytest -q -p no:cacheprovider bench --benchmark-only --bench-rows "$out/bench_rows.json" 2>&1 \
        | tee "$out/bench_suite.log" | tail -40
      ;;
    step20) step LOG=d20 TIMEOUT=400 TAIL=26 --depth 20 --batch 16 --peer --profile 3 --seed-recipe; peer_d20_ran=1 ;;
    step12)
      step LOG=d12 TIMEOUT=300 TAIL=18 --depth 12 --batch 32 --peer --profile 3 --no-peer-profile
      phases d12
      ;;
    plain20) step LOG=d20_plain --depth 20 --batch 16 ;;
    micro) step LOG=d20_mb4 --depth 20 --batch 16 --micro-batch 4 ;;
    micro12) step LOG=d12_mb16 --depth 12 --batch 32 --micro-batch 16 ;;
    budget) step LOG=d20_budget --depth 20 --batch 16 --override=--activation_memory_budget=0.5 ;;
    keepmlp) step LOG=d20_keepmlp --depth 20 --batch 16 --override=--recompute_mlp=false ;;
    keepmlp12) step LOG=d12_keepmlp --depth 12 --batch 32 --override=--recompute_mlp=false ;;
    fp8_20) step LOG=d20_fp8 TIMEOUT=420 TAIL=60 --depth 20 --batch 16 --profile 3 --top 40 --override=--fp8=true \
              --peer --no-peer-profile --seed-recipe; peer_d20_ran=1; phases d20_fp8 ;;
    fp8_12) step LOG=d12_fp8 TIMEOUT=360 TAIL=60 --depth 12 --batch 32 --profile 3 --top 40 --override=--fp8=true \
              --peer --no-peer-profile; phases d12_fp8 ;;
    base) variant_step base "variant base" 420 ;;
    at12) variant_shape=(--depth 12 --batch 32); variant_suffix=_d12 ;;
    hostcost)
      for m in d12 d20; do
        timeout 240 python3 bench/gpu_host_cost.py --model $m --json "$out/host_cost_$m.json" 2>&1 \
          | tee "$out/host_cost_$m.log" | short 18
      done
      ;;
    fp8scaling)
      timeout 300 python3 bench/gpu_fp8_scaling.py --json "$out/fp8_scaling.json" 2>&1 | tee "$out/fp8_scaling.log" \
        | short 50
      ;;
    knob:*)  # the base step with one inductor setting, e.g. knob:coordinate_descent_tuning=True; inductor's
      # performance hints in the step's log say what it declined (e.g. "skipping cudagraphs due to ...")
      TORCH_LOGS=perf_hints variant_step "$(echo "${part#knob:}" | tr -c 'A-Za-z0-9_\n' _)" "$part" 420 \
        --inductor "${part#knob:}" ;;
    variants|variant:*)
      if [ "$part" = variants ]; then dirs=(.variants/*/); else dirs=(".variants/${part#variant:}/"); fi
      for dir in "${dirs[@]}"; do
        [ -d "$dir" ] || { echo "variants: no folder $dir"; break; }
        name=$(basename "$dir"); saved="$out/replaced_$name"
        files=$(cd "$dir" && find . -type f | sed 's|^\./||')
        echo "-- variant $name: $(echo $files)"
        for f in $files; do
          if [ -e "$f" ]; then mkdir -p "$saved/$(dirname "$f")" && cp "$f" "$saved/$f"; fi
          mkdir -p "$(dirname "$f")" && cp "$dir/$f" "$f"
        done
        gpu_tests=$(echo "$files" | grep '^tests/gpu/' || true)
        if [ -n "$gpu_tests" ]; then
          python3 -m pytest -q -p no:cacheprovider -m gpu $gpu_tests 2>&1 | tee "$out/tests_$name.log" | tail -4
        fi
        variant_step "$name" "variant $name" 360
        for f in $files; do
          if [ -e "$saved/$f" ]; then cp "$saved/$f" "$f"; else rm -f "$f"; fi
        done
      done
      ;;
    mempeak)
      step LOG=d20_mempeak_budget TIMEOUT=420 TAIL=24 --depth 20 --batch 16 --memory-peak 16 --override=--fp8=true \
        --override=--activation_memory_budget=0.5
      step LOG=d20_mempeak TIMEOUT=300 TAIL=24 --depth 20 --batch 16 --memory-peak 16 --override=--fp8=true
      ;;
    fp8test)
      python3 -m pytest -q -p no:cacheprovider -m gpu tests/gpu/test_fp8_gpu.py tests/gpu/test_memory_peak_gpu.py \
        "tests/gpu/test_kernels_gpu.py::test_a_new_number_of_supervised_rows_does_not_compile_the_loss_again" 2>&1 \
        | tee "$out/fp8_tests.log" | tail -6
      ;;
    fp8budget) step LOG=d20_fp8_budget TIMEOUT=420 --depth 20 --batch 16 --override=--fp8=true \
                 --override=--activation_memory_budget=0.5 ;;
    train)
      if [ -z "$peer_d20_ran" ] && [ -f .peer/nanochat_sft_bench.py ]; then  # the side-by-side, same command
        python3 .peer/nanochat_sft_bench.py --depth 20 --batch 16 2>&1 | tee "$out/peer_d20.log" | tail -5
      fi
      python3 -m fastsft.train --config d20.toml --out_dir=/tmp/d20 --log_every=25 2>&1 | tee "$out/d20_train.log" \
        | grep -v "^  " | tail -40
      cp /tmp/d20/summary.json /tmp/d20/metrics.jsonl /tmp/d20/report.md "$out/" 2>/dev/null
      ;;
    peerprof12)
      timeout 200 python3 bench/peer_profile.py --depth 12 --batch 32 2>&1 | tee "$out/peer_profile_d12.log" | short 12
      ;;
    eval)
      python3 bench/gpu_eval.py --json "$out/eval.json" 2>&1 | tee "$out/eval.log" | tail -15
      ;;
    bundle)
      (cd "$out" && find . -mindepth 1 -maxdepth 1 -newer "$started" \( -type d -o -name '*.log' -o -name '*.json' \) \
        -printf '%P\n' >"$started.list" && [ -s "$started.list" ] && tar czf bundle.tgz -T "$started.list" \
        && xargs -d '\n' rm -rf <"$started.list" && echo "bundle.tgz: $(wc -l <"$started.list") entries")
      ;;
    *) echo "unknown part $part" ;;
  esac
done
echo "== done $(date -u +%H:%M:%S)"
