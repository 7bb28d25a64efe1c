#!/usr/bin/env bash
# Every GPU check of amem_sgl in one command (see benchmarks/gpu_check.py): both Triton kernels
# against their references, both kernel microbenchmarks against a device copy, and a dummy-weight
# Llama-3-8B-shaped server's TTFT (cold / prefix hit / spliced). Writes
# benchmarks/results/<date>-<gpu>-gpu-check.{json,md}. Capped at 8 minutes; per-step timeouts inside.
# Without CUDA: prints the plan and "not run: no CUDA", exit 0.
#   bash benchmarks/gpu_check.sh [--only kernels bench-rope ...]
set -euo pipefail
cd "$(dirname "$0")/.."
unset TRITON_INTERPRET
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TRITON_DEFAULT_FP_FUSION=1
exec timeout --kill-after=10 480 python -m benchmarks.gpu_check "$@"
