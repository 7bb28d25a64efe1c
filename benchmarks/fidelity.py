"""Fidelity of chunk reuse against a full re-prefill of the same prompt, on the real server.

For every question (benchmarks.fidelity_data): its chunks are registered (KV computed once, behind
the chat preamble), the prompt [preamble][chunks in shuffled order][question] is composed, and the
same input_ids are generated greedily:

* ``full`` -- once, under a fresh cache salt: a full prefill that shares no KV with anything;
* ``reuse`` -- once per blend policy (each in its own namespace, so each splices afresh): chunk
  spans declared, resident chunks spliced (KV copied, keys re-rotated) and the policy's tokens
  recomputed in a blend pass.

Chunks are registered once per question; each policy splices them under its own cache salt, so no
policy sees another's blended prefix (the salted preamble is computed in the blend pass).

Reported overall, per length band and per hop count: first-token agreement, identical greedy
answers, correctness (gold city in the answer) of both arms and their agreement, exact match (the
first city the answer names is the gold one) and token F1 against the gold answer for both arms,
the recomputed fraction of chunk tokens (recompute cost in full-depth token equivalents: the
deviation probe's layers count too), prompt tokens the model computed in each arm, and TTFT (both
arms streamed, timed to the first output) as full ÷ reuse.

    python -m benchmarks.fidelity                  # starts a server with configs/default.yaml
    python -m benchmarks.fidelity --url http://127.0.0.1:30000 --n 120
    python -m benchmarks.fidelity --quick          # 6 questions, for a smoke run
    python -m benchmarks.fidelity --policies none sink:4 hkvd:0.15 sink+hkvd:4:0.1 all --n 60
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import platform
import re
import sys
import time
import uuid
from collections import defaultdict
from pathlib import Path

from tqdm.auto import tqdm

from amem_sgl.blend.policy import BlendPolicy
from amem_sgl.chunks.client import ChunkClient
from benchmarks.fidelity_data import CITIES, Question, make_questions

CITY_WORDS = {c.lower() for c in CITIES}

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


@dataclasses.dataclass
class Row:
    policy: str
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
    recomputed_chunk_tokens: int
    recompute_cost_tokens: float  # recomputed + probe layers, in full-depth token equivalents
    reuse_ttft_s: float
    full_ttft_s: float
    reuse_em: bool
    full_em: bool
    reuse_f1: float
    full_f1: float
    preamble_tokens_in_blend_pass: int


def parse_policy(text: str) -> BlendPolicy:
    return BlendPolicy.parse(text)


def policy_label(policy: BlendPolicy) -> str:
    return policy.label


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def exact_match(answer: str, gold: str) -> bool:
    """The first city the answer names is the gold city."""
    named = [w for w in _words(answer) if w in CITY_WORDS]
    return bool(named) and named[0] == gold.lower()


def token_f1(answer: str, gold: str) -> float:
    """SQuAD-style token F1 of the answer against the gold answer."""
    pred, ref = _words(answer), _words(gold)
    common = sum(min(pred.count(w), ref.count(w)) for w in set(ref))
    if not pred or not ref or common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def evaluate(client: ChunkClient, questions: list[Question], namespace: str, max_new_tokens: int,
             policies: list[BlendPolicy], num_layers: int) -> list[Row]:
    rows = []
    for q in tqdm(questions, desc="fidelity", unit="question", file=sys.stderr):
        # Chunks are registered once; every policy splices them afresh under its own cache salt (so
        # no policy reuses another's blended prefix; the uncached preamble is computed in the blend
        # pass, a numeric no-op against a cached one).
        chunks = [client.register(text, namespace).token_ids for text in q.chunks]
        prompt = client.layout.compose(chunks, q.prompt)
        full = client.generate(prompt, max_new_tokens=max_new_tokens, isolated=True, ttft=True)
        for policy in policies:
            label = policy_label(policy)
            reuse = client.generate(prompt, namespace, max_new_tokens=max_new_tokens, blend=policy, ttft=True,
                                    cache_salt=f"{label}-{uuid.uuid4().hex}")
            # The server's own report of what it recomputed (0 when nothing was spliced).
            recomputed = int(reuse.amem.get("recomputed_tokens", 0))
            # The salted preamble is computed by the blend pass (SGLang counts it as cached). In serving
            # it is an ordinary cached prefix, so it is kept out of the prefill count and reported apart.
            gap = int(reuse.amem.get("gap_tokens", 0))
            cost = recomputed + reuse.amem.get("probed_tokens", 0) * reuse.amem.get("probe_layers", 0) / num_layers
            gold = q.gold.lower()
            rows.append(Row(
                label, q.qid, q.band, q.hops, len(prompt.input_ids), prompt.chunk_tokens,
                reuse.computed_prompt_tokens + recomputed, full.computed_prompt_tokens,
                reuse.output_ids[:1] == full.output_ids[:1], reuse.output_ids == full.output_ids,
                gold in reuse.text.lower(), gold in full.text.lower(), reuse.text, full.text,
                reuse.latency_s, full.latency_s, recomputed, cost, reuse.ttft_s, full.ttft_s,
                exact_match(reuse.text, gold), exact_match(full.text, gold),
                token_f1(reuse.text, gold), token_f1(full.text, gold), gap))
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
            "reuse_em": sum(r.reuse_em for r in group) / n,
            "full_em": sum(r.full_em for r in group) / n,
            "reuse_f1": sum(r.reuse_f1 for r in group) / n,
            "full_f1": sum(r.full_f1 for r in group) / n,
            "recomputed_fraction": sum(r.recompute_cost_tokens for r in group)
            / max(sum(r.chunk_tokens for r in group), 1),
            "recomputed_token_fraction": sum(r.recomputed_chunk_tokens for r in group)
            / max(sum(r.chunk_tokens for r in group), 1),
            "ttft_ratio_full_over_reuse": sum(r.full_ttft_s for r in group)
            / max(sum(r.reuse_ttft_s for r in group), 1e-9),
            "reuse_computed_tokens": reuse_tokens,
            "full_computed_tokens": full_tokens,
            "prefill_ratio_full_over_reuse": full_tokens / max(reuse_tokens, 1),
            "latency_ratio_full_over_reuse": sum(r.full_latency_s for r in group)
            / max(sum(r.reuse_latency_s for r in group), 1e-9),
        }

    by: dict[tuple, list[Row]] = defaultdict(list)
    bands = {"short": 0, "medium": 1, "long": 2}
    policies = list(dict.fromkeys(r.policy for r in rows))
    for r in rows:
        p = policies.index(r.policy)
        by[(p, 0, 0, f"{r.policy} overall")].append(r)
        by[(p, 1, bands.get(r.band, 9), f"{r.policy} band={r.band}")].append(r)
        by[(p, 2, r.hops, f"{r.policy} hops={r.hops}")].append(r)
    return {key[-1]: stats(by[key]) for key in sorted(by)}


def bench_config(out_dir: Path) -> Path:
    """configs/default.yaml without the residency service: fidelity is about blending, and writing
    every chunk of every policy through to disk would only add I/O (~23 KB per SmolLM2 token)."""
    import yaml

    config = yaml.safe_load((ROOT / "configs" / "default.yaml").read_text())
    config.setdefault("amem", {})["residency"] = {"enabled": False}
    path = out_dir / "fidelity-config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def model_layers(client: ChunkClient) -> int:
    """The served model's layer count (from its config.json)."""
    info = client._get("/get_model_info")
    return int(json.loads((Path(info["model_path"]) / "config.json").read_text())["num_hidden_layers"])


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
    cols = ["n", "identical_answers", "first_token_agreement", "correctness_agreement", "reuse_accuracy",
            "full_accuracy", "reuse_em", "full_em", "reuse_f1", "full_f1", "recomputed_fraction",
            "mean_chunk_tokens", "prefill_ratio_full_over_reuse", "ttft_ratio_full_over_reuse"]
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
    parser.add_argument("--policies", nargs="+", default=["none"],
                        help="blend policies to compare (each against the same full prefill): none, all, sink:K, "
                             "tail:K, edges:K, hkvd:R[@L], sink+hkvd:K:R[@L], edges+hkvd:K:R[@L]")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    n = 6 if args.quick else args.n

    server = None
    if args.url is None:
        from amem_sgl.local_server import free_port, start_server

        port = free_port()
        args.out.mkdir(parents=True, exist_ok=True)
        server = start_server(f"{sys.executable} -m amem_sgl.launch_server --config {bench_config(args.out)} "
                              f"--port {port}", port=port, log_path=args.out / "fidelity-server.log", cwd=ROOT)
        args.url = server.url
    try:
        t0 = time.monotonic()
        client = ChunkClient(args.url)
        policies = [parse_policy(p) for p in args.policies]
        rows = evaluate(client, make_questions(n, seed=args.seed), f"fidelity-{args.seed}", args.max_new_tokens,
                        policies, model_layers(client))
        summary = summarize(rows)
        meta = {"policy": ", ".join(policy_label(p) for p in policies), "model": "SmolLM2-135M-Instruct (bf16)",
                "device": device_name(), "date": dt.datetime.now().isoformat(timespec="seconds"),
                "seconds": time.monotonic() - t0, "max_new_tokens": args.max_new_tokens, "seed": args.seed,
                "command": "python -m benchmarks.fidelity " + " ".join(argv if argv is not None else sys.argv[1:])}
        tag = "fidelity-" + "-".join(re.sub(r"[^a-z0-9.]", "", policy_label(p)) for p in policies)
        tag = tag if len(tag) <= 80 else f"fidelity-{len(policies)}policies"
        json_path, md_path = write_report(summary, rows, meta, args.out, tag + ("-quick" if args.quick else ""))
        print(md_path.read_text())
        print(f"wrote {json_path} and {md_path}")
    finally:
        if server is not None:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
