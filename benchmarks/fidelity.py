"""Fidelity of chunk reuse against a full re-prefill of the same prompt, on the real server.

For every question (benchmarks.fidelity_data): its chunks are registered (KV computed once, behind
the chat preamble), the prompt [preamble][chunks in shuffled order][question] is composed, and the
same input_ids are generated twice, greedy:

* ``reuse`` -- chunk spans declared: resident chunks are spliced (KV copied, keys re-rotated);
* ``full`` -- under a fresh cache salt: a full prefill that shares no KV with anything.

Reported overall, per length band and per hop count: first-token agreement, identical greedy
answers, correctness (gold city in the answer) of both arms and their agreement, and prompt tokens
the model computed in each arm.

    python -m benchmarks.fidelity                  # starts a server with configs/default.yaml
    python -m benchmarks.fidelity --url http://127.0.0.1:30000 --n 120
    python -m benchmarks.fidelity --quick          # 6 questions, for a smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import platform
import sys
import time
from collections import defaultdict
from pathlib import Path

from tqdm.auto import tqdm

from amem_sgl.chunks.client import ChunkClient
from benchmarks.fidelity_data import Question, make_questions

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


@dataclasses.dataclass
class Row:
    qid: str
    band: str
    hops: int
    prompt_tokens: int
    chunk_tokens: int
    reuse_computed_tokens: int
    full_computed_tokens: int
    first_token_agree: bool
    identical: bool
    reuse_correct: bool
    full_correct: bool
    reuse_answer: str
    full_answer: str
    reuse_latency_s: float
    full_latency_s: float


def evaluate(client: ChunkClient, questions: list[Question], namespace: str, max_new_tokens: int) -> list[Row]:
    rows = []
    for q in tqdm(questions, desc="fidelity", unit="question", file=sys.stderr):
        chunks = [client.register(text, namespace).token_ids for text in q.chunks]
        prompt = client.layout.compose(chunks, q.prompt)
        reuse = client.generate(prompt, namespace, max_new_tokens=max_new_tokens)
        full = client.generate(prompt, max_new_tokens=max_new_tokens, isolated=True)
        gold = q.gold.lower()
        rows.append(Row(
            q.qid, q.band, q.hops, len(prompt.input_ids), prompt.chunk_tokens,
            reuse.computed_prompt_tokens, full.computed_prompt_tokens,
            reuse.output_ids[:1] == full.output_ids[:1], reuse.output_ids == full.output_ids,
            gold in reuse.text.lower(), gold in full.text.lower(), reuse.text, full.text,
            reuse.latency_s, full.latency_s))
    return rows


def summarize(rows: list[Row]) -> dict:
    def stats(group: list[Row]) -> dict:
        n = len(group)
        reuse_tokens = sum(r.reuse_computed_tokens for r in group)
        full_tokens = sum(r.full_computed_tokens for r in group)
        return {
            "n": n,
            "first_token_agreement": sum(r.first_token_agree for r in group) / n,
            "identical_answers": sum(r.identical for r in group) / n,
            "reuse_accuracy": sum(r.reuse_correct for r in group) / n,
            "full_accuracy": sum(r.full_correct for r in group) / n,
            "correctness_agreement": sum(r.reuse_correct == r.full_correct for r in group) / n,
            "mean_prompt_tokens": sum(r.prompt_tokens for r in group) / n,
            "mean_chunk_tokens": sum(r.chunk_tokens for r in group) / n,
            "reuse_computed_tokens": reuse_tokens,
            "full_computed_tokens": full_tokens,
            "prefill_ratio_full_over_reuse": full_tokens / max(reuse_tokens, 1),
            "latency_ratio_full_over_reuse": sum(r.full_latency_s for r in group)
            / max(sum(r.reuse_latency_s for r in group), 1e-9),
        }

    by: dict[str, list[Row]] = defaultdict(list)
    for r in rows:
        by[f"band={r.band}"].append(r)
        by[f"hops={r.hops}"].append(r)
    return {"overall": stats(rows), **{key: stats(group) for key, group in sorted(by.items())}}


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0).replace(" ", "-")
    return f"cpu-{platform.machine()}-{os.cpu_count()}cores"


def write_report(summary: dict, rows: list[Row], meta: dict, out_dir: Path, tag: str) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{dt.date.today().isoformat()}-{meta['device']}-{tag}"
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    json_path.write_text(json.dumps({"meta": meta, "summary": summary,
                                     "rows": [dataclasses.asdict(r) for r in rows]}, indent=2))
    cols = ["n", "first_token_agreement", "identical_answers", "reuse_accuracy", "full_accuracy",
            "correctness_agreement", "mean_chunk_tokens", "prefill_ratio_full_over_reuse"]
    lines = [f"# Fidelity: {meta['policy']} vs full re-prefill ({meta['model']}, {meta['device']})", "",
             f"Command: `{meta['command']}`  ", f"Date: {meta['date']}, {meta['seconds']:.0f} s", "",
             "| group | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for group, s in summary.items():
        lines.append(f"| {group} | " + " | ".join(
            f"{s[c]:.3f}" if isinstance(s[c], float) else str(s[c]) for c in cols) + " |")
    md_path.write_text("\n".join(lines) + "\n")
    return json_path, md_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running amem server (default: start one)")
    parser.add_argument("--n", type=int, default=120, help="questions (spread over the length bands)")
    parser.add_argument("--quick", action="store_true", help="6 questions: a smoke run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    n = 6 if args.quick else args.n

    server = None
    if args.url is None:
        from amem_sgl.local_server import free_port, start_server

        port = free_port()
        args.out.mkdir(parents=True, exist_ok=True)
        server = start_server(f"{sys.executable} -m amem_sgl.launch_server --config configs/default.yaml "
                              f"--port {port}", port=port, log_path=args.out / "fidelity-server.log", cwd=ROOT)
        args.url = server.url
    try:
        t0 = time.monotonic()
        client = ChunkClient(args.url)
        rows = evaluate(client, make_questions(n, seed=args.seed), f"fidelity-{args.seed}", args.max_new_tokens)
        summary = summarize(rows)
        meta = {"policy": "splice, no recompute", "model": "SmolLM2-135M-Instruct (bf16)",
                "device": device_name(), "date": dt.datetime.now().isoformat(timespec="seconds"),
                "seconds": time.monotonic() - t0, "max_new_tokens": args.max_new_tokens, "seed": args.seed,
                "command": "python -m benchmarks.fidelity " + " ".join(argv if argv is not None else sys.argv[1:])}
        json_path, md_path = write_report(summary, rows, meta, args.out, "fidelity-splice" + ("-quick" if args.quick else ""))
        print(md_path.read_text())
        print(f"wrote {json_path} and {md_path}")
    finally:
        if server is not None:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
