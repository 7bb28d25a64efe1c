"""Served end to end: ``amem.model.packed_linear`` on vs off (amem_sgl.cpu_linear), same prompts.

Two servers side by side (the default config, and the same with ``packed_linear: false``), asked
the same greedy requests in alternation, request by request (this host's speed drifts by up to 2x
between minutes, so arms run back to back would compare two hosts): a cold ~800-token prefill (TTFT), a 4-token extend over that cached
prompt (a memory turn's shape: TTFT), and 64 decoded tokens (ms per token). The arms' output token
ids are compared: the packed weights must give the same answers bit for bit, so any difference is
reported as a failure. Ratios are off / on, minimum over the repeats.

    python -m benchmarks.packed_linear            # ~4 min on 2 cores
    python -m benchmarks.packed_linear --quick    # a smoke run

Writes ``benchmarks/results/<date>-<device>-packed-linear.{json,md}``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import tempfile
import time
from pathlib import Path

import requests
import yaml

from amem_sgl.local_server import free_port, start_server
from benchmarks.fidelity import device_name, write_run

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
FACTS = " ".join(f"Fact {i}: the parcel numbered {i} waits in locker {i * 7 % 13} on floor {i % 5}." for i in range(48))


def generate(url: str, text: str, max_new_tokens: int) -> tuple[list[int], dict]:
    reply = requests.post(f"{url}/generate", timeout=600, json={
        "text": text, "sampling_params": {"max_new_tokens": max_new_tokens, "temperature": 0, "ignore_eos": True}})
    reply.raise_for_status()
    body = reply.json()
    return body["output_ids"], body["meta_info"]


def serve(packed: bool, work: Path):
    config = yaml.safe_load((ROOT / "configs" / "default.yaml").read_text())
    config.setdefault("amem", {}).setdefault("model", {})["packed_linear"] = packed
    name = "on" if packed else "off"
    path = work / f"config-{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    port = free_port()
    command = f"{sys.executable} -m amem_sgl.launch_server --config {path} --port {port} --max-total-tokens 16384"
    return start_server(command, port=port, log_path=work / f"server-{name}.log", cwd=ROOT)


def one_round(url: str, r: int, decode_tokens: int, out: dict) -> None:
    prompt = f"Run {r}. {FACTS}"  # a fresh prefix each round: a cold prefill
    _, meta = generate(url, prompt, 1)
    out["cold_ttft_s"].append(meta["first_token_latency"])
    out["prompt_tokens"] = meta["prompt_tokens"]
    _, meta = generate(url, prompt + " Which locker?", 1)  # the prompt cached: a short extend
    out["extend_ttft_s"].append(meta["first_token_latency"])
    out["extend_new_tokens"] = meta["prompt_tokens"] - meta["cached_tokens"]
    ids, meta = generate(url, prompt + " Where is parcel 7?", decode_tokens)
    decode_s = meta["e2e_latency"] - meta["first_token_latency"]
    out["decode_ms_per_token"].append(decode_s / max(len(ids) - 1, 1) * 1e3)
    out["outputs"].append(ids)


def measure(repeats: int, decode_tokens: int, work: Path) -> tuple[dict, dict]:
    arms = {True: {}, False: {}}
    for out in arms.values():
        out.update(cold_ttft_s=[], extend_ttft_s=[], decode_ms_per_token=[], outputs=[])
    with serve(True, work) as on, serve(False, work) as off:
        urls = {True: on.url, False: off.url}
        one_round(on.url, -1, 2, {k: [] for k in arms[True]})  # warm-up round each
        one_round(off.url, -1, 2, {k: [] for k in arms[False]})
        for r in range(repeats):
            for packed in ((True, False) if r % 2 == 0 else (False, True)):
                one_round(urls[packed], r, decode_tokens, arms[packed])
    return arms[True], arms[False]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 repeats, 16 decoded tokens")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    repeats, decode = (2, 16) if args.quick else (args.repeats, args.decode_tokens)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="amem-packed-") as tmp:
        on, off = measure(repeats, decode, Path(tmp))
    same = on["outputs"] == off["outputs"]
    ratios = {key: min(off[key]) / min(on[key]) for key in ("cold_ttft_s", "extend_ttft_s", "decode_ms_per_token")}
    data = {"meta": {"device": device_name(), "date": dt.datetime.now().isoformat(timespec="seconds"),
                     "repeats": repeats, "decode_tokens": decode, "quick": args.quick,
                     "seconds": round(time.monotonic() - started, 1)},
            "on": on, "off": off, "identical_outputs": same, "ratio_off_over_on": ratios}
    lines = [f"# Packed linear weights served, on vs off ({device_name()})", "",
             f"Command: `python -m benchmarks.packed_linear{' --quick' if args.quick else ''}`  ",
             f"Date: {data['meta']['date']}, {data['meta']['seconds']} s; min of {repeats} per arm, arms alternated; "
             f"SmolLM2-135M bf16, prompt {on.get('prompt_tokens')} tokens, extend of {on.get('extend_new_tokens')} new "
             f"tokens over the cached prompt", "",
             f"Greedy output token ids identical in both arms: **{same}**", "",
             "| measure | packed (on) | F.linear (off) | off / on |", "|---|---|---|---|",
             f"| cold prefill TTFT (ms) | {min(on['cold_ttft_s']) * 1e3:.1f} | {min(off['cold_ttft_s']) * 1e3:.1f} | "
             f"{ratios['cold_ttft_s']:.2f}x |",
             f"| short extend over the cached prompt TTFT (ms) | {min(on['extend_ttft_s']) * 1e3:.1f} | "
             f"{min(off['extend_ttft_s']) * 1e3:.1f} | {ratios['extend_ttft_s']:.2f}x |",
             f"| decode (ms per token) | {min(on['decode_ms_per_token']):.1f} | {min(off['decode_ms_per_token']):.1f} | "
             f"{ratios['decode_ms_per_token']:.2f}x |", ""]
    write_run(args.out, "packed-linear", args.quick, data, lines)
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
