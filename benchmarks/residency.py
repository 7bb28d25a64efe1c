"""Restore cost vs recompute cost per chunk token, for each residency tier, on the real server.

One server (configs/default.yaml, a fresh disk tier), chunks of ~300 tokens registered once. Then,
per repeat, the same prompt [preamble][chunks][question] with max_new_tokens=1 (latency = TTFT):

* recompute -- under a fresh cache salt, no spans: every chunk token prefilled (what a miss costs);
* device    -- spans declared, chunk nodes resident: spliced (the floor);
* cpu       -- after SGLang's /flush_cache empties the device tree: chunks restored from the
               residency service's CPU tier;
* disk      -- after the service is killed (its supervisor restarts it with an empty CPU tier) and
               the device tree flushed again: chunks restored from the safetensors files.

Reported: TTFT per arm, per chunk token (TTFT minus the device arm's TTFT, over chunk tokens) and
the ratio restore ÷ recompute per tier, all from one run. Every restored request is checked to
report all chunk tokens as loaded (``usage.amem.loaded_tokens``).

    python -m benchmarks.residency [--chunks 8] [--repeats 3]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import signal
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psutil

from amem_sgl.chunks.client import ChunkClient, ComposedPrompt
from amem_sgl.local_server import flush_cache, free_port, start_server
from benchmarks.fidelity import device_name
from benchmarks.ttft import chunk_texts

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def residency_pid(server) -> int:
    return next(iter(residency_pids(server)))


def residency_pids(server) -> list[int]:
    """Live residency service processes under the server (a killed one may linger as a zombie)."""
    pids = []
    for proc in psutil.Process(server.proc.pid).children(recursive=True):
        try:
            if proc.status() != psutil.STATUS_ZOMBIE and any("amem_sgl.residency.service" in c for c in proc.cmdline()):
                pids.append(proc.pid)
        except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
            continue
    return pids


def run(url: str, server, n_chunks: int, repeats: int) -> dict:
    client = ChunkClient(url)
    namespace = f"residency-bench-{uuid.uuid4().hex[:8]}"
    texts = chunk_texts(n_chunks * 300, client, chunk_tokens=300)
    chunks = [client.register(text, namespace).token_ids for text in texts]
    prompt = client.layout.compose(chunks, "Summarize the notes in one sentence.")
    plain = ComposedPrompt(prompt.input_ids, [])
    time.sleep(2)  # let the background write-through finish before timing
    arms: dict[str, list[float]] = {"recompute": [], "device": [], "cpu": [], "disk": []}
    loaded: dict[str, list[int]] = {"cpu": [], "disk": []}
    for _ in range(repeats):
        arms["recompute"].append(client.generate(plain, max_new_tokens=1, isolated=True).latency_s)
        flush_cache(url)  # device arm: re-register (a plain prefill), then splice
        chunks = [client.register(text, namespace).token_ids for text in texts]
        arms["device"].append(client.generate(prompt, namespace, max_new_tokens=1,
                                              cache_salt=uuid.uuid4().hex).latency_s)
        flush_cache(url)
        got = client.generate(prompt, namespace, max_new_tokens=1, cache_salt=uuid.uuid4().hex)
        arms["cpu"].append(got.latency_s)
        loaded["cpu"].append(got.amem.get("loaded_tokens", 0))
        pid = residency_pid(server)
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while True:
            try:
                if residency_pid(server) != pid:
                    break
            except StopIteration:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("residency service not restarted")
            time.sleep(0.1)
        time.sleep(1.0)
        flush_cache(url)
        got = client.generate(prompt, namespace, max_new_tokens=1, cache_salt=uuid.uuid4().hex)
        arms["disk"].append(got.latency_s)
        loaded["disk"].append(got.amem.get("loaded_tokens", 0))
    n = prompt.chunk_tokens
    for tier, counts in loaded.items():
        if any(c != n for c in counts):
            raise RuntimeError(f"{tier} arm did not restore every chunk token: {counts} != {n}")
    med = {arm: statistics.median(times) for arm, times in arms.items()}
    per_token = {arm: max(med[arm] - med["device"], 0.0) / n * 1e6 for arm in ("recompute", "cpu", "disk")}
    return {
        "chunk_tokens": n, "chunks": len(chunks), "prompt_tokens": len(prompt.input_ids),
        "ttft_s": med, "ttft_all_s": arms, "extra_us_per_chunk_token_over_device": per_token,
        "restore_over_recompute_ttft": {t: med[t] / med["recompute"] for t in ("device", "cpu", "disk")},
        "restore_over_recompute_per_token": {t: per_token[t] / per_token["recompute"] if per_token["recompute"] else None
                                             for t in ("cpu", "disk")},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chunks", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="amem-residency-bench-"))
    port = free_port()
    server = start_server(f"{sys.executable} -m amem_sgl.launch_server --config configs/default.yaml --port {port}",
                          port=port, log_path=args.out / "residency-server.log", cwd=ROOT,
                          env={"AMEM_SGL_RESIDENCY_DIR": str(work / "disk")})
    try:
        t0 = time.monotonic()
        result = run(server.url, server, args.chunks, args.repeats)
    finally:
        server.stop()
    meta = {"device": device_name(), "model": "SmolLM2-135M-Instruct (bf16)", "seconds": time.monotonic() - t0,
            "date": dt.datetime.now().isoformat(timespec="seconds"),
            "command": "python -m benchmarks.residency " + " ".join(argv if argv is not None else sys.argv[1:])}
    stem = args.out / f"{dt.date.today().isoformat()}-{meta['device']}-residency"
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, **result}, indent=2))
    r = result
    lines = [f"# Restore vs recompute per tier ({meta['model']}, {meta['device']})", "",
             f"Command: `{meta['command']}`  ", f"Date: {meta['date']}; {r['chunks']} chunks, "
             f"{r['chunk_tokens']} chunk tokens in a {r['prompt_tokens']}-token prompt; medians of "
             f"{args.repeats}", "",
             "| arm | TTFT s | TTFT ÷ recompute | extra µs per chunk token over device | per-token ÷ recompute |",
             "|---|---|---|---|---|"]
    for arm in ("recompute", "device", "cpu", "disk"):
        ratio = 1.0 if arm == "recompute" else r["restore_over_recompute_ttft"][arm]
        extra = r["extra_us_per_chunk_token_over_device"].get(arm)
        per = r["restore_over_recompute_per_token"].get(arm) if arm in ("cpu", "disk") else (1.0 if arm == "recompute" else None)
        lines.append(f"| {arm} | {r['ttft_s'][arm]:.3f} | {ratio:.3f} | "
                     f"{'' if extra is None else f'{extra:.1f}'} | {'' if per is None else f'{per:.3f}'} |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
