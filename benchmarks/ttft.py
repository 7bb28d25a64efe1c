"""Time to first token of a long prompt: cold, fully cached, and spliced from memory chunks.

One run starts amem's server twice on this machine: with amem's linear-cost extend attention, and
with SGLang's stock torch_native extend (``amem.attention.linear_extend: false``), and measures on
each (max_new_tokens = 1, so latency = TTFT):

* cold    -- the prompt under a fresh cache salt (nothing cached);
* cached  -- the same prompt again (every token but the last from the radix tree);
* spliced -- chunks registered beforehand, the prompt composed from them (KV spliced + re-rotated).

Ratios are within one server and one run. Target (issue 4): cached or spliced TTFT <= 10% of cold.

    python -m benchmarks.ttft [--tokens 4000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import tempfile
from pathlib import Path

import yaml

from amem_sgl.chunks.client import ChunkClient, ComposedPrompt
from amem_sgl.local_server import free_port, start_server
from benchmarks.fidelity import device_name
from benchmarks.fidelity_data import FILLER

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def chunk_texts(target_tokens: int, client: ChunkClient, chunk_tokens: int = 500) -> list[str]:
    texts, total, i = [], 0, 0
    while total < target_tokens:
        words, n = [], 0
        while n < chunk_tokens:
            sentence = f"Note {i}: {FILLER[i % len(FILLER)]}"
            words.append(sentence)
            n += len(client.layout.tokens(sentence + " "))
            i += 1
        text = " ".join(words) + "\n"
        texts.append(text)
        total += len(client.layout.tokens(text))
    return texts


def measure(url: str, tokens: int, repeats: int, tag: str) -> dict:
    client = ChunkClient(url)
    texts = chunk_texts(tokens, client)
    chunks = [client.register(text, f"ttft-{tag}") for text in texts]
    prompt = client.layout.compose([c.token_ids for c in chunks], "Summarize the notes in one sentence.")
    plain = ComposedPrompt(prompt.input_ids, [])  # same tokens, no spans declared
    # Spliced first: right after registration only the preamble is an ordinary prefix, so the
    # chunks are truly spliced. Later spliced requests with another question are plain hits on the
    # sequence the first one left in the tree (reported as spliced_again).
    spliced = [client.generate(client.layout.compose([c.token_ids for c in chunks], f"Question {r}: what is "
                                                     f"note {r}?"), "ttft-" + tag, max_new_tokens=1)
               for r in range(repeats)]
    cold = [client.generate(plain, max_new_tokens=1, isolated=True).latency_s for _ in range(repeats)]
    client.generate(plain, max_new_tokens=1)  # warm the prefix tree with this exact prompt
    cached = [client.generate(plain, max_new_tokens=1) for _ in range(repeats)]
    return {
        "prompt_tokens": len(plain.input_ids),
        "cold_s": statistics.median(cold),
        "cached_s": statistics.median(g.latency_s for g in cached),
        "cached_tokens": cached[-1].cached_tokens,
        "spliced_first_s": spliced[0].latency_s,
        "spliced_first_cached_tokens": spliced[0].cached_tokens,
        "cached_over_cold": statistics.median(g.latency_s for g in cached) / statistics.median(cold),
        "spliced_first_over_cold": spliced[0].latency_s / statistics.median(cold),
        "spliced_again_s": statistics.median(g.latency_s for g in spliced[1:]) if repeats > 1 else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    base = yaml.safe_load((ROOT / "configs" / "default.yaml").read_text())
    results = {}
    for arm, linear in (("amem linear extend", True), ("stock torch_native extend", False)):
        config = dict(base, amem=dict(base["amem"], attention={"linear_extend": linear}))
        with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as fh:
            yaml.safe_dump(config, fh)
        port = free_port()
        with start_server(f"{sys.executable} -m amem_sgl.launch_server --config {fh.name} --port {port}",
                          port=port, log_path=args.out / f"ttft-{int(linear)}-server.log", cwd=ROOT) as server:
            results[arm] = measure(server.url, args.tokens, args.repeats, str(int(linear)))
        Path(fh.name).unlink()
    head = ["prompt_tokens", "cold_s", "cached_s", "cached_over_cold", "spliced_first_s", "spliced_first_over_cold",
            "cached_tokens", "spliced_first_cached_tokens"]
    lines = [f"# TTFT, {args.tokens}-token prompt ({device_name()}, SmolLM2-135M bf16)", "",
             f"Command: `python -m benchmarks.ttft --tokens {args.tokens} --repeats {args.repeats}`", "",
             "| arm | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
    for arm, r in results.items():
        lines.append(f"| {arm} | " + " | ".join(f"{r[h]:.3f}" if isinstance(r[h], float) else str(r[h])
                                                for h in head) + " |")
    stem = args.out / f"{dt.date.today().isoformat()}-{device_name()}-ttft"
    stem.with_suffix(".json").write_text(json.dumps(results, indent=2))
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
