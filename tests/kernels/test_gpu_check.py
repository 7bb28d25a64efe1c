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


# A step that starts a "server" (answers /health) and then hangs, as a stuck server-ttft step would.
HANGING_STEP = r'''
import sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[4])  # the repository root
from benchmarks import gpu_check
from amem_sgl.local_server import free_port, start_server

gpu_check._stop_on_sigterm()
port = free_port()
server_py = ("import http.server as h\n"
             "class H(h.BaseHTTPRequestHandler):\n"
             "    def do_GET(self):\n"
             "        self.send_response(200); self.end_headers(); self.wfile.write(b'ok')\n"
             "    def log_message(self, *a): pass\n"
             f"h.HTTPServer(('127.0.0.1', {port}), H).serve_forever()\n")
Path(sys.argv[1]).write_text(server_py)
with start_server(f"{sys.executable} {sys.argv[1]}", port=port, log_path=Path(sys.argv[2]), timeout_s=60) as server:
    Path(sys.argv[3]).write_text(str(server.proc.pid))
    time.sleep(600)
'''


def test_a_step_past_its_timeout_stops_the_server_it_started(tmp_path):
    """run_step's timeout sends the step SIGTERM; the step kills the server it started (its own
    process group, out of run_step's reach) before it exits, so a rerun finds the GPU free."""
    import sys
    import time

    from benchmarks import gpu_check

    script, pid_file = tmp_path / "step.py", tmp_path / "server.pid"
    script.write_text(HANGING_STEP)
    argv = [sys.executable, str(script), str(tmp_path / "server.py"), str(tmp_path / "server.log"), str(pid_file),
            str(ROOT)]
    result = gpu_check.run_step(gpu_check.STEPS[-1], 25, grace_s=15, argv=argv)
    assert result["ok"] is False and result["error"].startswith("timed out"), result
    pid = int(pid_file.read_text())
    for _ in range(50):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        os.killpg(pid, 9)
        raise AssertionError("the step's server outlived the step's timeout")


def test_on_a_gpu_without_sglang_results_go_to_out_too_and_the_server_step_is_skipped(tmp_path, monkeypatch):
    """The lent GPU's image has no SGLang and returns only $OUT: the server step is reported as
    skipped (the run still passes on the steps that ran), and the report lands in --out and $OUT."""
    import importlib.util

    import torch

    from benchmarks import gpu_check

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "sglang" else real_find_spec(name, *a))
    monkeypatch.setattr(gpu_check, "cuda_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Fake GPU")
    ran = []
    monkeypatch.setattr(gpu_check, "run_step", lambda step, timeout: ran.append(step.name) or {"ok": True})
    monkeypatch.setenv("OUT", str(tmp_path / "out"))
    # main() drops TRITON_INTERPRET (compiled Triton on a GPU): restored for the rest of the session
    monkeypatch.setenv("TRITON_INTERPRET", os.environ.get("TRITON_INTERPRET", "1"))
    assert gpu_check.main(["--only", "kernels", "server-ttft", "--out", str(tmp_path / "results")]) == 0
    assert ran == ["kernels"]
    for folder in ("results", "out"):
        (report,) = (tmp_path / folder).glob("*-gpu-check.json")
        steps = json.loads(report.read_text())["steps"]
        assert steps["kernels"]["ok"] is True and "sglang is not installed" in steps["server-ttft"]["skipped"]
        assert (tmp_path / folder / report.name.replace(".json", ".md")).exists()
    monkeypatch.setattr(gpu_check, "run_step", lambda step, timeout: {"ok": False, "error": "exit 1"})
    assert gpu_check.main(["--only", "kernels", "--out", str(tmp_path / "results")]) == 1  # a failure still fails
