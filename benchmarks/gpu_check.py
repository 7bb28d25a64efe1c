"""Every GPU check of amem_sgl in one command, with a time limit per step (device time is scarce).

    bash benchmarks/gpu_check.sh            # or: python -m benchmarks.gpu_check [--only STEP ...]

Steps (each its own child process, killed at its timeout; later steps still run):

* ``env``      -- the GPU, driver, clocks and library versions (the card as found: nothing changed);
* ``kernels``  -- both Triton kernels compiled on this GPU and compared with float64 references on
  fresh random inputs, outputs poisoned first (SmolLM2 3x64 and Llama-3-8B 8x128; bf16, fp16, fp32;
  several sequences, unaligned lengths, GQA, negative deltas);
* ``bench-rope``  -- benchmarks/kernels/bench_rope_rerotate.py: one Llama-3-8B layer of K (8 KV heads
  x 128, bf16), 4K-32K tokens, against a device-to-device copy timed in the same run. Target: the
  kernel at >= 85% of copy bandwidth at every size;
* ``bench-blend`` -- benchmarks/kernels/bench_blend_attention.py: the same layer, 8K-32K keys,
  blend (15% scattered queries) and extend (last 512) against SDPA and a copy of the K+V bytes;
* ``server-ttft`` -- an amem server on ``--load-format dummy`` with Llama-3-8B shapes (a Llama-3.1-8B
  config.json in a temporary folder, SmolLM2's tokenizer files copied in; random weights), TTFT of
  an 8K-token memory prompt cold vs prefix hit vs spliced (+ the server's blend policy), the
  kernels JIT-compiled by a smaller warm-up round first. Target: spliced >= 8x faster than cold.

Timing follows the workplace's method (/work/.library/device/METHOD.md): device events through
``triton.testing.do_bench`` (median), warm-up first, rotating input sets larger than L2, references
in float64 on fresh random inputs, copy bandwidth measured in the same run.

Writes ``benchmarks/results/<date>-<gpu>-gpu-check.{json,md}`` (rewritten after every step, so a run
cut short keeps what it measured). Without CUDA it prints the plan and ``not run: no CUDA``, exit 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
TOTAL_BUDGET_S = 470  # the whole run fits 8 minutes of device time, start-up of the shell included


@dataclasses.dataclass(frozen=True)
class Step:
    name: str
    timeout_s: int
    what: str


STEPS = (
    Step("env", 30, "nvidia-smi, torch/triton/sglang versions"),
    Step("kernels", 90, "rope_rerotate + blend_attention (Triton, compiled here) vs float64 references, "
                        "fresh random inputs, SmolLM2 3x64 and Llama-3-8B 8x128, bf16/fp16/fp32"),
    Step("bench-rope", 60, "bench_rope_rerotate: 8x128 bf16, 4K/8K/16K/32K tokens vs device copy "
                           "(target kernel >= 85% of copy bandwidth)"),
    Step("bench-blend", 75, "bench_blend_attention: 32q/8kv x 128 bf16, 8K/16K/32K keys, blend + extend "
                            "vs SDPA and device copy"),
    Step("server-ttft", 210, "amem server, --load-format dummy, Llama-3-8B shapes: TTFT cold / prefix hit / "
                             "spliced at 8K memory tokens (target spliced >= 8x faster than cold)"),
)
ROPE_TOKENS = [4096, 8192, 16384, 32768]
BLEND_KEYS = [8192, 16384, 32768]
ROPE_TARGET_PCT = 85.0
SPLICE_TARGET_X = 8.0
MEMORY_TOKENS = 8192

# Llama-3.1-8B's architecture (Llama-3-8B's shapes with a 128K context, so an 8K memory prompt fits).
LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "head_dim": 128, "hidden_act": "silu", "rms_norm_eps": 1e-5, "vocab_size": 128256,
    "max_position_embeddings": 131072, "rope_theta": 500000.0, "tie_word_embeddings": False,
    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192},
    "attention_bias": False, "mlp_bias": False, "torch_dtype": "bfloat16",
    "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2,  # SmolLM2's tokenizer's ids
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


def cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


# ---------------------------------------------------------------------------------------- steps


def step_env() -> dict:
    import torch
    import triton

    try:  # the lent GPU's image has no SGLang: the kernels run without it
        import sglang
    except ImportError:
        sglang = None

    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,"
                          "clocks.mem,power.limit,temperature.gpu,compute_mode", "--format=csv"],
                         capture_output=True, text=True, timeout=20)
    props = torch.cuda.get_device_properties(0)
    return {"gpu": torch.cuda.get_device_name(0), "capability": list(torch.cuda.get_device_capability(0)),
            "sm_count": props.multi_processor_count, "memory_GiB": props.total_memory / 2**30,
            "torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton.__version__,
            "sglang": getattr(sglang, "__version__", None), "nvidia_smi": smi.stdout.strip() or smi.stderr.strip()}


# Relative-error bounds against float64 (METHOD.md): the output's own rounding dominates.
ROPE_TOL = {"bfloat16": 1e-2, "float16": 2e-3, "float32": 1e-5}
BLEND_TOL = {"bfloat16": 1e-2, "float16": 2e-3, "float32": 1e-3}  # fp32 dots run as tf32 (~3e-4)


def _poisoned_empty_like(t):
    """Fill a same-size block with NaN and free it: CUDA's caching allocator hands that block to the
    launcher's next ``empty_like``, so an element the kernel never writes stays NaN."""
    import torch

    torch.full_like(t, float("nan"))
    if t.is_cuda:
        torch.cuda.synchronize()


KERNEL_SHAPES = (("smollm2", 3, 9, 64), ("llama-3-8b", 8, 32, 128))  # (name, kv heads, q heads, head dim)


def step_kernels(device: str = "cuda", sizes: tuple = (1, 777, 5000), kv_lens: tuple = (1500, 333, 4097),
                 shapes: tuple = KERNEL_SHAPES, dtypes: tuple = ("bfloat16", "float16", "float32")) -> dict:
    """``device="cpu"`` (with TRITON_INTERPRET=1) and small sizes check this step's own logic in CI."""
    import torch

    from benchmarks.kernels.bench_rope_rerotate import check as rope_check
    from benchmarks.kernels.bench_rope_rerotate import table
    from kernels.blend_attention import blend_attention, blend_attention_reference

    device = torch.device(device)
    gen = torch.Generator().manual_seed(time.time_ns() % 2**31)
    rows, failures = [], []
    for model, kv_heads, q_heads, head_dim in shapes:
        cs = table(head_dim, device=device)
        for name in dtypes:
            dtype = getattr(torch, name)
            for n in sizes:
                err = rope_check(n, dtype, device, "triton", cs, gen, kv_heads, head_dim)
                ok = err <= ROPE_TOL[name]
                rows.append({"kernel": "rope_rerotate", "model": model, "dtype": name, "tokens": n,
                             "rel_error_vs_fp64": err, "tolerance": ROPE_TOL[name], "ok": ok})
                failures += [] if ok else [rows[-1]]
            # blend: three sequences of unaligned lengths, scattered and tail queries, random slots.
            q_pos, q_lens = [], []
            for i, kv_len in enumerate(kv_lens):
                pos = (torch.sort(torch.randperm(kv_len, generator=gen)[: max(1, kv_len // 7)]).values if i != 1
                       else torch.arange(max(kv_len - 65, 0), kv_len))
                q_pos.append(pos)
                q_lens.append(len(pos))
            total = sum(kv_lens)
            slots = torch.randperm(total + 100, generator=gen)[:total]
            k_cache = torch.randn(total + 100, kv_heads, head_dim, generator=gen)
            v_cache = torch.randn(total + 100, kv_heads, head_dim, generator=gen)
            q = torch.randn(sum(q_lens), q_heads, head_dim, generator=gen)
            args = [t.to(device) for t in (q, k_cache, v_cache, torch.cat(q_pos), torch.tensor(q_lens), slots,
                                           torch.tensor(list(kv_lens)))]
            low = [a.to(dtype) if a.is_floating_point() else a for a in args]
            _poisoned_empty_like(low[0])
            got = blend_attention(*low, backend="triton").double()
            ref = blend_attention_reference(*[a.double() if a.is_floating_point() else a for a in low])
            err = ((got - ref).norm() / ref.norm()).item()
            ok = bool(torch.isfinite(got).all()) and err <= BLEND_TOL[name]
            rows.append({"kernel": "blend_attention", "model": model, "dtype": name, "tokens": total,
                         "queries": int(sum(q_lens)), "rel_error_vs_fp64": err, "tolerance": BLEND_TOL[name],
                         "all_written": bool(torch.isfinite(got).all()), "ok": ok})
            failures += [] if ok else [rows[-1]]
    return {"rows": rows, "ok": not failures, "failures": failures}


def step_bench_rope() -> dict:
    import torch

    from benchmarks.kernels import bench_rope_rerotate

    rows = bench_rope_rerotate.run(ROPE_TOKENS, torch.device("cuda"))
    worst = min(r["kernel_pct_of_contiguous_copy"] for r in rows)
    return {"rows": rows, "target": f"kernel >= {ROPE_TARGET_PCT}% of copy bandwidth at every size",
            "worst_kernel_pct_of_copy": worst, "worst_launcher_pct_of_copy": min(r["pct_of_contiguous_copy"]
                                                                             for r in rows),
            "ok": worst >= ROPE_TARGET_PCT and all(r["rel_error_vs_fp64"] < 1e-2 for r in rows)}


def step_bench_blend() -> dict:
    import torch

    from benchmarks.kernels import bench_blend_attention

    rows = bench_blend_attention.run(BLEND_KEYS, torch.device("cuda"))
    return {"rows": rows, "ok": all(r["rel_error_vs_reference"] < 1e-2 for r in rows)}


def write_model_folder(target: Path, *, layers: int | None = None) -> Path:
    """A Llama-3-8B-shaped model folder for ``--load-format dummy``: config.json + SmolLM2's tokenizer."""
    from amem_sgl.models import ensure_embedded_model

    smollm2 = ensure_embedded_model("smollm2")
    target.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (smollm2 / name).exists():
            shutil.copy(smollm2 / name, target / name)
    config = dict(LLAMA3_8B, **({"num_hidden_layers": layers} if layers else {}))
    (target / "config.json").write_text(json.dumps(config, indent=1))
    return target


def step_server_ttft(*, cpu: bool = False, memory_tokens: int = MEMORY_TOKENS, layers: int | None = None,
                     rounds: int = 3, startup_timeout_s: float = 150) -> dict:
    """``cpu``/``layers``/``memory_tokens`` exist to prove the plumbing on a machine without a GPU
    (tests: a 1-layer model, a few hundred tokens); the GPU run uses the defaults."""
    import yaml

    from amem_sgl.local_server import amem_state, free_port, start_server
    from benchmarks.ttft import measure

    work = Path(tempfile.mkdtemp(prefix="amem-gpu-check-"))
    try:
        model = write_model_folder(work / "llama-3-8b-dummy", layers=layers)
        sglang = {"host": "127.0.0.1", "dtype": "bfloat16", "enable_metrics": True, "sleep_on_idle": True,
                  "context_length": 32768, "max_running_requests": 8}
        if cpu:
            sglang["max_total_tokens"] = 16384
        else:
            sglang["disable_cuda_graph"] = True  # prefill timing only: graphs would cost start-up, not TTFT
        base = yaml.safe_load((ROOT / "configs" / "default.yaml").read_text())["amem"]
        amem = dict(base, residency={"enabled": False})  # write-through of 8B-sized KV is not what is timed
        config_path = work / "config.yaml"
        config_path.write_text(yaml.safe_dump({"sglang": sglang, "amem": amem}))
        port = free_port()
        command = (f"{sys.executable} -m amem_sgl.launch_server --config {config_path} --model-path {model} "
                   f"--load-format dummy --port {port}")
        log = work / "server.log"
        t0 = time.monotonic()
        with start_server(command, port=port, log_path=log, cwd=ROOT, timeout_s=startup_timeout_s) as server:
            startup_s = time.monotonic() - t0
            # Warm-up round: JIT-compiles the Triton kernels and SGLang's, so no arm pays for it.
            measure(server.url, max(256, memory_tokens // 8), 1, "warm")
            runs = [measure(server.url, memory_tokens, 3, f"r{i}") for i in range(rounds)]
            state = amem_state(server.url)
        med = lambda key: sorted(r[key] for r in runs)[len(runs) // 2]  # noqa: E731
        cold, cached, spliced = med("cold_s"), med("cached_s"), med("spliced_first_s")
        result = {"command": command, "startup_s": startup_s, "memory_tokens": memory_tokens,
                  "prompt_tokens": runs[0]["prompt_tokens"], "cold_s": cold, "prefix_hit_s": cached,
                  "spliced_s": spliced, "cold_over_prefix_hit": cold / cached, "cold_over_spliced": cold / spliced,
                  "spliced_cached_tokens": med("spliced_first_cached_tokens"), "runs": runs,
                  "amem_state": state, "target": f"cold / spliced >= {SPLICE_TARGET_X}",
                  "ok": cold / spliced >= SPLICE_TARGET_X}
        return result
    finally:
        if (work / "server.log").exists():  # kept where the device run's files come back from, if any
            keep = Path(os.environ.get("OUT") or tempfile.gettempdir()) / "gpu-check-server.log"
            shutil.copy(work / "server.log", keep)
        shutil.rmtree(work, ignore_errors=True)


def missing_for(step: Step) -> str | None:
    """Why ``step`` cannot run on this machine (it is then skipped, not failed), or None."""
    import importlib.util

    if step.name == "server-ttft" and importlib.util.find_spec("sglang") is None:
        return ("sglang is not installed here (the lent GPU's image has none and cannot install it): "
                "run this step on a CUDA machine after `bash install/install.sh --gpu`")
    return None


RUNNERS = {"env": step_env, "kernels": step_kernels, "bench-rope": step_bench_rope,
           "bench-blend": step_bench_blend, "server-ttft": step_server_ttft}


# ---------------------------------------------------------------------------------------- driver


STOP_GRACE_S = 15  # a step past its timeout gets SIGTERM (it kills the server it started), then SIGKILL


def run_step(step: Step, timeout_s: float, *, grace_s: float = STOP_GRACE_S, argv: list[str] | None = None) -> dict:
    """One step in a child process; its JSON result, or what went wrong (exit code, timeout, tail).
    A step past ``timeout_s`` is sent SIGTERM, on which it kills any server it started (in a process
    group of its own, out of this one's reach) before it exits; SIGKILL after ``grace_s``."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "step.json"
        t0 = time.monotonic()
        argv = argv or [sys.executable, "-m", "benchmarks.gpu_check", "--run-step", step.name]  # tests: argv
        proc = subprocess.Popen(argv + ["--step-out", str(out)], cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            _, stderr = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                _, stderr = proc.communicate(timeout=grace_s)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                _, stderr = proc.communicate()
            return {"ok": False, "error": f"timed out after {timeout_s:.0f}s", "wall_s": time.monotonic() - t0,
                    "stderr_tail": (stderr or "")[-3000:]}
        wall = time.monotonic() - t0
        if proc.returncode != 0 or not out.exists():
            return {"ok": False, "error": f"exit {proc.returncode}", "wall_s": wall,
                    "stderr_tail": (stderr or "")[-3000:]}
        result = json.loads(out.read_text())
        result["wall_s"] = wall
        return result


def _stop_on_sigterm() -> None:
    """In a step's process: SIGTERM (its timeout) kills the servers it started, then exits 143."""
    def stop(signum, frame):
        from amem_sgl.local_server import kill_started

        kill_started()
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def markdown(results: dict, meta: dict) -> str:
    lines = [f"# GPU check, {meta['gpu']} ({meta['date']})", "", f"Command: `{meta['command']}`", ""]
    lines += ["| step | ok | wall s | summary |", "|---|---|---|---|"]
    for name, r in results.items():
        summary = {k: v for k, v in r.items() if k not in ("rows", "runs", "amem_state", "stderr_tail", "failures",
                                                            "nvidia_smi", "ok", "wall_s", "command")}
        lines.append(f"| {name} | {r.get('ok', '-')} | {_fmt(r.get('wall_s', 0.0))} | "
                     + "; ".join(f"{k}={_fmt(v)}" for k, v in summary.items()) + " |")
    for name, r in results.items():
        rows = r.get("rows") or []
        if rows:
            head = list(dict.fromkeys(h for row in rows for h in row))  # rows of two kernels: the union
            lines += ["", f"## {name}", "", "| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
            lines += ["| " + " | ".join(_fmt(row.get(h)) for h in head) + " |" for row in rows]
        if r.get("stderr_tail"):
            lines += ["", f"## {name}: error", "", "```", r["stderr_tail"][-2000:], "```"]
    if "env" in results and results["env"].get("nvidia_smi"):
        lines += ["", "## nvidia-smi", "", "```", results["env"]["nvidia_smi"], "```"]
    return "\n".join(lines) + "\n"


def plan_text(steps) -> str:
    lines = [f"GPU check: {len(steps)} steps, {sum(s.timeout_s for s in steps)} s of step timeouts "
             f"(whole run capped at {TOTAL_BUDGET_S} s)"]
    for s in steps:
        lines.append(f"  {s.name:<12} timeout {s.timeout_s:>3} s  "
                     f"python -m benchmarks.gpu_check --run-step {s.name}   # {s.what}")
    lines.append(f"  results -> {RESULTS}/<date>-<gpu>-gpu-check.{{json,md}}"
                 + (f" and {os.environ['OUT']}/" if os.environ.get("OUT") else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=[s.name for s in STEPS], help="run these steps only")
    parser.add_argument("--out", type=Path, default=RESULTS,
                        help="results folder (default benchmarks/results; a copy also goes to $OUT when set, "
                             "the folder a lent machine's files come back from)")
    parser.add_argument("--run-step", choices=list(RUNNERS), help=argparse.SUPPRESS)  # the child's entry
    parser.add_argument("--step-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)  # compiled Triton on a GPU, never the interpreter
    if args.run_step:
        _stop_on_sigterm()
        args.step_out.write_text(json.dumps(RUNNERS[args.run_step](), default=str))
        return 0
    steps = [s for s in STEPS if not args.only or s.name in args.only]
    print(plan_text(steps), flush=True)
    if not cuda_available():
        print("not run: no CUDA")
        return 0
    import torch

    from benchmarks.fidelity import device_name

    meta = {"gpu": torch.cuda.get_device_name(0), "date": dt.date.today().isoformat(),
            "command": "bash benchmarks/gpu_check.sh" + (f" --only {' '.join(args.only)}" if args.only else "")}
    name = f"{meta['date']}-{device_name()}-gpu-check"
    folders = [args.out] + ([Path(os.environ["OUT"])] if os.environ.get("OUT") else [])
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + TOTAL_BUDGET_S
    results: dict[str, dict] = {}
    for step in steps:
        left = deadline - time.monotonic()
        if left < 10:
            results[step.name] = {"ok": False, "error": "skipped: the run's time budget is spent"}
            continue
        missing = missing_for(step)
        if missing:
            results[step.name] = {"ok": None, "skipped": missing}
            print(f"[gpu-check] {step.name}: skipped: {missing}", flush=True)
            continue
        print(f"[gpu-check] {step.name} (timeout {min(step.timeout_s, left):.0f} s) ...", flush=True)
        results[step.name] = run_step(step, min(step.timeout_s, left))
        print(f"[gpu-check] {step.name}: ok={results[step.name].get('ok')} "
              f"{results[step.name].get('error', '')} ({results[step.name].get('wall_s', 0):.0f} s)", flush=True)
        write_results(folders, name, meta, results)
    write_results(folders, name, meta, results)
    print(markdown(results, meta))
    print("written: " + ", ".join(f"{folder / name}.{{json,md}}" for folder in folders))
    # a step that cannot run on this machine (skipped, said so above) does not fail the run
    return 0 if all(r.get("ok") or "skipped" in r for r in results.values()) else 1


def write_results(folders: list[Path], name: str, meta: dict, results: dict) -> None:
    """The run so far, rewritten after every step (a run cut short keeps what it measured)."""
    for folder in folders:
        (folder / f"{name}.json").write_text(json.dumps({"meta": meta, "steps": results}, indent=2, default=str))
        (folder / f"{name}.md").write_text(markdown(results, meta))


if __name__ == "__main__":
    sys.exit(main())
