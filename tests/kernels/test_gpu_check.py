"""benchmarks/gpu_check.sh without a GPU: it prints its plan and "not run: no CUDA", exit 0, and
writes nothing; the parts of its steps that can run here are checked here."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_without_cuda_it_prints_the_plan_and_not_run(tmp_path):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")  # no CUDA even where the CI machine has a GPU
    before = set((ROOT / "benchmarks" / "results").glob("*gpu-check*"))
    proc = subprocess.run(["bash", "benchmarks/gpu_check.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[-1] == "not run: no CUDA"
    from benchmarks.gpu_check import STEPS, TOTAL_BUDGET_S

    timeouts = {}
    for step in STEPS:
        (line,) = [ln for ln in lines if re.match(rf"\s+{re.escape(step.name)}\s+timeout", ln)]
        timeouts[step.name] = int(re.search(r"timeout\s+(\d+) s", line).group(1))
        assert f"--run-step {step.name}" in line
    assert set(timeouts) == {"env", "kernels", "bench-rope", "bench-blend", "server-ttft"}
    assert sum(timeouts.values()) <= TOTAL_BUDGET_S <= 8 * 60
    assert set((ROOT / "benchmarks" / "results").glob("*gpu-check*")) == before


def test_the_kernel_step_passes_on_the_interpreter_and_catches_a_wrong_kernel(monkeypatch):
    """The kernels step, at toy sizes and SmolLM2's shape on the Triton interpreter (conftest sets
    it; the GPU run adds Llama-3-8B's 8x128): passes for the real kernels, fails when the rotation
    is wrong (its check can fail)."""
    from benchmarks import gpu_check

    smollm2 = gpu_check.KERNEL_SHAPES[:1]
    result = gpu_check.step_kernels("cpu", sizes=(1, 37), kv_lens=(70, 33, 130), shapes=smollm2)
    assert result["ok"], result["failures"]
    assert {(r["kernel"], r["dtype"]) for r in result["rows"]} == {
        (k, d) for k in ("rope_rerotate", "blend_attention") for d in ("bfloat16", "float16", "float32")}

    import benchmarks.kernels.bench_rope_rerotate as bench

    real = bench.rope_rerotate
    monkeypatch.setattr(bench, "rope_rerotate", lambda k, src, dst, delta, *a, **kw: real(k, src, dst, delta + 1,
                                                                                         *a, **kw))
    broken = gpu_check.step_kernels("cpu", sizes=(37,), kv_lens=(70, 33, 130), shapes=smollm2, dtypes=("float32",))
    assert not broken["ok"]
    assert {r["kernel"] for r in broken["failures"]} == {"rope_rerotate"}


def test_the_dummy_model_folder_has_llama_3_8b_shapes_and_a_tokenizer(tmp_path):
    from benchmarks.gpu_check import write_model_folder

    folder = write_model_folder(tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    assert (config["num_hidden_layers"], config["num_key_value_heads"], config["head_dim"],
            config["num_attention_heads"], config["hidden_size"]) == (32, 8, 128, 32, 4096)
    assert (folder / "tokenizer.json").exists()
    from transformers import AutoConfig, AutoTokenizer

    assert AutoConfig.from_pretrained(folder).num_key_value_heads == 8
    assert len(AutoTokenizer.from_pretrained(folder)("hello world").input_ids) > 0
