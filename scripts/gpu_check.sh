#!/usr/bin/env bash
# Every GPU figure of the README, on one lent H100/H200, in <= 8 minutes ($GPU_CHECK_SECONDS, default 470 s,
# bounds the whole run). The CPU CI never runs it.
#
#   scripts/gpu_check.sh                    # all stages
#   scripts/gpu_check.sh kernels smollm2    # some stages
#
# Stages (each bounded by its own timeout; a stage that fails or runs out leaves its log and the rest run):
#   tests     the gpu-marked tests and the kernel tests, on CUDA
#   kernels   scripts/bench_kernels.py at Llama-3.1-8B's shapes: every QuantLinear path vs bf16 F.linear
#   smollm2   triton decode table of a SmolLM2-135M-shaped model (random weights) + its validation, with the
#             float / all-W8 / all-W4 decode under CUDA graphs and eagerly
#   supernet  scripts/bench_supernet.py: dense vs vectorised vs naive search step at B=8, S=512
#   llama1b   table + validation for a Llama-3.2-1B-shaped model
#   llama8b   table + validation for a Llama-3.1-8B-shaped model, and one supernet search step of it (memory)
# Writes results/gpu/*.json|log and latency_tables/<device>/; with $OUT set (a folder), also a tarball there.
set -u
cd "$(dirname "$0")/.."
STAGES="${*:-tests kernels smollm2 supernet llama8b llama1b}"
R=results/gpu
mkdir -p "$R"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=false
PROFILE_ARGS="model.dtype=bfloat16 latency.backend=triton latency.device=cuda latency.min_run_time=0.02 latency.e2e_repeats=3"

pack() {  # results travel back even when a later stage is cut short
  [ -n "${OUT:-}" ] && tar czf "$OUT/gpu_results.tgz" results/gpu latency_tables 2>/dev/null
  return 0
}

DEADLINE=${GPU_CHECK_SECONDS:-470}  # the whole script's budget: a stage gets at most what is left of it
stage() {  # stage NAME SECONDS CMD...
  local name=$1 limit=$2; shift 2
  local left=$((DEADLINE - SECONDS))
  if [ "$left" -lt 20 ]; then echo "$name skipped: out of time" | tee -a "$R/status.txt"; return; fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "=== $name (limit ${limit}s): $*"
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@" > "$R/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc $((SECONDS - t0))s" | tee -a "$R/status.txt"
  tail -n 25 "$R/$name.log"
  pack
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$R/device.txt" 2>&1
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" >> "$R/device.txt" 2>&1
python3 -c "import gemlite; print('gemlite', gemlite.__version__)" >> "$R/device.txt" 2>&1
cat "$R/device.txt"

for s in $STAGES; do
  case $s in
    tests) stage tests-gpu 170 python3 -m pytest -q -p no:cacheprovider -m "not slow" --timeout 120 \
             tests/test_gpu.py tests/test_static_decode.py tests/test_qlinear.py tests/test_kernels_triton.py ;;
    kernels) stage kernels 170 python3 scripts/bench_kernels.py --skip-cpu --shapes llama8b --groups 64 128 \
               --m 1 4 16 512 2048 --out $R/bench_kernels_llama8b.json ;;
    smollm2)
      stage profile-smollm2 120 python3 -m archquant profile model.name=random:smollm2-135m $PROFILE_ARGS
      stage validate-smollm2 150 python3 scripts/bench_latency_model.py --model random:smollm2-135m --backend triton \
        --device cuda --scenarios decode --subnets 8 --repeats 5 --out $R/bench_latency_model_smollm2.json ;;
    supernet) stage supernet 120 python3 scripts/bench_supernet.py --random-weights --device cuda --batch 8 --seq 512 \
                --naive-layers 30 --steps 3 --out $R/bench_supernet.json ;;
    llama1b)
      stage profile-llama1b 120 python3 -m archquant profile model.name=random:llama-3.2-1b $PROFILE_ARGS
      stage validate-llama1b 120 python3 scripts/bench_latency_model.py --model random:llama-3.2-1b --backend triton \
        --device cuda --scenarios decode --subnets 4 --repeats 3 --no-speedup --out $R/bench_latency_model_llama1b.json ;;
    llama8b)
      stage profile-llama8b 150 python3 -m archquant profile model.name=random:llama-3.1-8b $PROFILE_ARGS
      stage validate-llama8b 150 python3 scripts/bench_latency_model.py --model random:llama-3.1-8b --backend triton \
        --device cuda --scenarios decode --subnets 3 --repeats 3 --no-speedup --out $R/bench_latency_model_llama8b.json
      stage supernet-llama8b 120 python3 scripts/bench_supernet.py --model random:llama-3.1-8b --device cuda \
        --dtype bfloat16 --batch 1 --seq 256 --variants vectorized --steps 2 --out $R/bench_supernet_llama8b.json ;;
    *) echo "unknown stage $s (tests kernels smollm2 supernet llama1b llama8b)"; exit 2 ;;
  esac
done
cat "$R/status.txt"
