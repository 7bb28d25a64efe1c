"""The numeric floor: how often a mere precision change alters this model's greedy answers.

The same fidelity questions (benchmarks.fidelity_data, same seed) are answered by a full prefill on
two servers started one after the other: ``--dtype bfloat16`` (the served default) and
``--dtype float32``. The identical-answer rate between them is the bar a KV-reuse policy is held to:
agreement with a bf16 full prefill at or above it is as good as the numbers allow.

    python -m benchmarks.numeric_floor [--n 60] [--seed 0] [--set twohop|main]

The fidelity harness measures the floor on its own run's prompts (``python -m benchmarks.fidelity
--floor``): its bf16 full-prefill arm replayed on an fp32 server (:func:`replay_fp32`), per question,
so every band and group of the run carries its own floor.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path

from tqdm.auto import tqdm

from amem_sgl.chunks.client import ChunkClient
from amem_sgl.local_server import free_port, start_server
from benchmarks.fidelity import device_name
from benchmarks.fidelity_data import make_questions

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def answers(dtype: str, questions, max_new_tokens: int, out: Path) -> list[tuple[list[int], str]]:
    port = free_port()
    command = (f"{sys.executable} -m amem_sgl.launch_server --config configs/default.yaml --port {port} "
               f"--dtype {dtype}")
    with start_server(command, port=port, log_path=out / f"floor-{dtype}-server.log", cwd=ROOT) as server:
        client = ChunkClient(server.url)
        result = []
        for q in tqdm(questions, desc=f"full prefill {dtype}", file=sys.stderr):
            prompt = client.layout.compose([client.layout.tokens(c) for c in q.chunks], q.prompt)
            g = client.generate(prompt, max_new_tokens=max_new_tokens, isolated=True)
            result.append((g.output_ids, g.text))
        return result


def replay_fp32(client: ChunkClient, items, max_new_tokens: int, out: Path) -> dict[str, tuple[list[int], str]]:
    """The items' full prefills (composed by ``client``'s layout: the same input ids as the bf16
    run) answered greedily on an fp32 server started for it: qid -> (output ids, text)."""
    from benchmarks.fidelity import start_bench_server

    with start_bench_server(out, "float32") as server:
        fp32 = ChunkClient(server.url, client.layout.tokenizer)
        result = {}
        for q in tqdm(items, desc="full prefill float32", file=sys.stderr):
            prompt = client.layout.compose([client.layout.tokens(c) for c in q.chunks], q.prompt)
            g = fp32.generate(prompt, max_new_tokens=max_new_tokens, isolated=True)
            result[q.qid] = (g.output_ids, g.text)
        return result


def latest(results: Path, dataset: str | None = None) -> float | None:
    """The identical-answer rate of the newest numeric floor in ``results`` (None: none): with
    ``dataset`` ("main", "twohop"), the floor a fidelity run with --floor measured on that set's
    prompts (its "none overall" row), falling back, for the two-hop set, to the standalone runs."""
    if dataset is not None:
        for path in sorted(results.glob("*-fidelity-*.json"), reverse=True):
            data = json.loads(path.read_text())
            meta = data.get("meta", {})
            if meta.get("set", "twohop") == dataset and meta.get("split", "test") == "test" and meta.get("numeric_floor"):
                row = next((s for g, s in data["summary"].items() if g.endswith("overall")), {})
                if row.get("numeric_floor") is not None:
                    return row["numeric_floor"]
        if dataset != "twohop":
            return None
    files = sorted(results.glob("*-numeric-floor.json"))
    return json.loads(files[-1].read_text()).get("identical_answers_fp32_vs_bf16") if files else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    questions = make_questions(args.n, seed=args.seed)
    bf16 = answers("bfloat16", questions, args.max_new_tokens, args.out)
    fp32 = answers("float32", questions, args.max_new_tokens, args.out)
    identical = [a[0] == b[0] for a, b in zip(bf16, fp32)]
    first = [a[0][:1] == b[0][:1] for a, b in zip(bf16, fp32)]
    correct = {name: sum(q.gold.lower() in ans[1].lower() for q, ans in zip(questions, arm)) / len(questions)
               for name, arm in (("bf16", bf16), ("fp32", fp32))}
    summary = {"n": len(questions), "identical_answers_fp32_vs_bf16": sum(identical) / len(questions),
               "first_token_agreement": sum(first) / len(questions), "accuracy_bf16": correct["bf16"],
               "accuracy_fp32": correct["fp32"], "device": device_name(),
               "date": dt.datetime.now().isoformat(timespec="seconds"),
               "command": "python -m benchmarks.numeric_floor " + " ".join(argv if argv is not None else sys.argv[1:])}
    stem = args.out / f"{dt.date.today().isoformat()}-{device_name()}-numeric-floor"
    stem.with_suffix(".json").write_text(json.dumps(summary, indent=2))
    lines = [f"# Numeric floor: full prefill fp32 vs bf16 (SmolLM2-135M, {summary['device']})", "",
             f"Command: `{summary['command']}`", "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v:.3f} |" if isinstance(v, float) else f"| {k} | {v} |"
              for k, v in summary.items() if k not in ("device", "date", "command")]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
