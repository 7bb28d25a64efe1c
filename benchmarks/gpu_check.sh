#!/usr/bin/env bash
# Every GPU check of amem_sgl in one command (see benchmarks/gpu_check.py): both Triton kernels
# against their references, both kernel microbenchmarks against a device copy, and a dummy-weight
# Llama-3-8B-shaped server's TTFT (cold / prefix hit / spliced). Writes
# benchmarks/results/<date>-<gpu>-gpu-check.{json,md} (and a copy into $OUT when set: what comes back
# from a lent machine). Capped at 8 minutes; per-step timeouts inside; a step this machine cannot
# run (the server's, where SGLang is not installed) is reported as skipped.
# Without CUDA: prints the plan and "not run: no CUDA", exit 0.
#   bash benchmarks/gpu_check.sh [--only kernels bench-rope ...]
set -euo pipefail
cd "$(dirname "$0")/.."
unset TRITON_INTERPRET
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TRITON_DEFAULT_FP_FUSION=1
# The lent machine's image names its Python python3 ("python" may be missing there).
py="${PYTHON:-$(command -v python || command -v python3)}"
exec timeout --kill-after=10 480 "$py" -m benchmarks.gpu_check "$@"
