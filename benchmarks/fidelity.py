"""Fidelity of chunk reuse against a full re-prefill of the same prompt, on the real server.

Three question sets (benchmarks.fidelity_data): ``main`` -- single-fact lookups among distractor
facts of other kinds, which a full prefill of SmolLM2-135M answers (0.77 on 60), the yardstick of
the product's promise; ``twohop`` -- the earlier one/two-hop city questions (full prefill right
~0.3 of the time); ``long`` -- the cost curve's questions over its memory chunks, answered in free
form (64 new tokens by default): ``identical`` is then the whole 64-token text, ``answer_agreement``
the first entity each answer names (as on the other sets), ``text_f1_vs_full`` the token F1 of the
reuse answer against the full prefill's (1.0: the same words). ``--split calibration`` draws the main set's calibration split (other people,
another seed stream), the one any tuned threshold is fitted on; reported figures use ``test``.

For every question its chunks are registered (KV computed once, behind the chat preamble), the
prompt [preamble][chunks in shuffled order][question] is composed, and the same input_ids are
generated greedily:

* ``full`` -- once, under a fresh cache salt: a full prefill that shares no KV with anything (its
  top-20 first-token logprobs returned);
* ``reuse`` -- once per blend policy (the request's ``kv_hints`` blend field), each under its own
  cache salt so it splices afresh: resident chunks spliced (KV copied, keys re-rotated) and the
  policy's tokens recomputed in a blend pass (the logprobs of the full arm's top-20 returned).

Reported overall, per length band and per hop count (benchmarks.fidelity_metrics): identical
greedy answers, answer agreement (normalised extracted answers equal), accuracy of both arms and its
difference, first-token agreement and KL(full || reuse), the recompute fraction (probe layers
counted), the prefill-token ratio and TTFT ratio (both arms streamed), and with ``--floor`` the
numeric floor on the same prompts (the full arm replayed on an fp32 server), per group.

    python -m benchmarks.fidelity --set main --n 60 --policies none edges:8 hkvd:0.08 all --floor
    python -m benchmarks.fidelity                  # starts a server with configs/default.yaml
    python -m benchmarks.fidelity --url http://127.0.0.1:30000 --n 120
    python -m benchmarks.fidelity --quick          # 3 questions, for a smoke run
    python -m benchmarks.fidelity --set long --n 24 --policies edges:8 exact --floor
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

from amem_sgl.chunks.client import ChunkClient
from benchmarks.fidelity_arms import Arm, guard_sweep, parse_arm
from benchmarks.fidelity_data import make_long_answers, make_lookups, make_questions
from benchmarks.fidelity_metrics import (answer_of, first_token_id_logprobs, first_token_kl, first_top_logprobs,
                                         logprob_request, summarize_rows, target_gaps)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


@dataclasses.dataclass
class Row:
    policy: str
    qid: str
    band: str
    hops: int
    kind: str
    prompt_tokens: int
    chunk_tokens: int
    reuse_computed_tokens: int
    full_computed_tokens: int
    first_token_agree: bool
    identical: bool
    answer_agree: bool  # the normalised extracted answers are equal
    reuse_correct: bool  # the extracted answer is the gold one
    full_correct: bool
    reuse_answer: str
    full_answer: str
    reuse_extracted: str
    full_extracted: str
    first_token_kl: float | None  # KL(full || reuse) of the first token (fidelity_metrics)
    recomputed_chunk_tokens: int
    recompute_cost_tokens: float  # recomputed + probe layers, in full-depth token equivalents
    reuse_ttft_s: float | None
    full_ttft_s: float | None
    reuse_f1: float
    full_f1: float
    preamble_tokens_in_blend_pass: int
    full_output_ids: list[int]
    floor_identical: bool | None = None  # an fp32 full prefill gives the bf16 one's answer
    floor_answer_agree: bool | None = None
    reuse_margin: float | None = None  # p1 - p2 of the first token on reused KV (blend and guarded arms)
    escalated: bool | None = None  # guarded arms: the guard sent the question to exact
    spliced_tokens: int = 0  # chunk tokens the compared request spliced (0: computed, or a prefix hit)
    in_place_tokens: int = 0  # of those, spliced in place (exact KV: never recomputed, amem_sgl.cache.splicer)
    text_f1: float = 0.0  # token F1 of the reuse answer's text against the full prefill's


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def token_f1(answer: str, gold: str) -> float:
    """SQuAD-style token F1 of the answer against the gold answer."""
    pred, ref = _words(answer), _words(gold)
    common = sum(min(pred.count(w), ref.count(w)) for w in set(ref))
    if not pred or not ref or common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def load_items(dataset: str, n: int, seed: int, split: str = "test") -> list:
    """The harness's items: ``main`` (single-fact lookups, the product's yardstick) or ``twohop``
    (the earlier 200-question set: one- and two-hop city questions; test split only) or ``long``
    (free-form answers over the cost curve's memory; test split only)."""
    if dataset == "main":
        return make_lookups(n, seed=seed, split=split)
    if dataset == "twohop":
        if split != "test":
            raise ValueError("the two-hop set has no calibration split")
        return make_questions(n, seed=seed)
    if dataset == "long":
        if split != "test":
            raise ValueError("the long-answer set has no calibration split")
        return make_long_answers(n, seed=seed)
    raise ValueError(f"unknown set {dataset!r} (main, twohop, long)")


def evaluate(client: ChunkClient, items: list, namespace: str, max_new_tokens: int,
             arms: list[Arm], num_layers: int) -> list[Row]:
    rows = []
    for q in tqdm(items, desc="fidelity", unit="question", file=sys.stderr):
        # Chunks are registered once; every arm splices them afresh under its own cache salt (so
        # no arm reuses another's blended prefix; the uncached preamble is computed in the blend
        # pass, a numeric no-op against a cached one).
        chunks = [client.register(text, namespace).token_ids for text in q.chunks]
        prompt = client.layout.compose(chunks, q.prompt)
        full = client.generate(prompt, max_new_tokens=max_new_tokens, isolated=True, ttft=True,
                               extra=logprob_request())
        full_top = first_top_logprobs(full.meta_info)
        gold = q.gold.lower()
        for arm in arms:
            res = arm.run(client, prompt, namespace, full_top, max_new_tokens, num_layers, chunks=chunks,
                          question=q.prompt)
            reuse = res.gen
            # The salted preamble is computed by the blend pass (SGLang counts it as cached). In serving
            # it is an ordinary cached prefix, so it is kept out of the prefill count and reported apart.
            ra, fa = answer_of(reuse.text), answer_of(full.text)
            rows.append(Row(
                arm.label, q.qid, q.band, q.hops, getattr(q, "kind", "city"), len(prompt.input_ids),
                prompt.chunk_tokens, res.computed_tokens, full.computed_prompt_tokens,
                reuse.output_ids[:1] == full.output_ids[:1], reuse.output_ids == full.output_ids, ra == fa,
                ra == gold, fa == gold, reuse.text, full.text, ra, fa,
                first_token_kl(full_top, first_token_id_logprobs(reuse.meta_info)), res.recomputed, res.cost_tokens,
                res.ttft_s, full.ttft_s, token_f1(reuse.text, gold), token_f1(full.text, gold), res.gap_tokens,
                full.output_ids, reuse_margin=res.margin, escalated=res.escalated,
                spliced_tokens=int(reuse.amem.get("spliced_tokens", 0)),
                in_place_tokens=int(reuse.amem.get("in_place_tokens", 0)), text_f1=token_f1(reuse.text, full.text)))
    return rows


def add_floor(rows: list[Row], fp32_outputs: dict[str, tuple[list[int], str]]) -> None:
    """Mark each row with the numeric floor of its prompt: does an fp32 full prefill give the bf16
    full prefill's answer (``fp32_outputs``: qid -> (output ids, text), see benchmarks.numeric_floor)."""
    for r in rows:
        if r.qid in fp32_outputs:
            ids, text = fp32_outputs[r.qid]
            r.floor_identical = ids == r.full_output_ids
            r.floor_answer_agree = answer_of(text) == r.full_extracted


def summarize(rows: list[Row]) -> dict:
    by: dict[tuple, list[dict]] = defaultdict(list)
    bands = {"short": 0, "medium": 1, "long": 2}
    policies = list(dict.fromkeys(r.policy for r in rows))
    for r in rows:
        p, d = policies.index(r.policy), dataclasses.asdict(r)
        by[(p, 0, 0, f"{r.policy} overall")].append(d)
        by[(p, 1, bands.get(r.band, 9), f"{r.policy} band={r.band}")].append(d)
        by[(p, 2, r.hops, f"{r.policy} hops={r.hops}")].append(d)
    return {key[-1]: summarize_rows(by[key]) for key in sorted(by)}


def bench_config(out_dir: Path, dtype: str | None = None) -> Path:
    """configs/default.yaml without the residency service (fidelity is about blending, and writing
    every chunk of every policy through to disk would only add I/O, ~23 KB per SmolLM2 token), with
    the 16K-token pool a shared 2-core machine asks for, and optionally another dtype (the floor)."""
    import yaml

    config = yaml.safe_load((ROOT / "configs" / "default.yaml").read_text())
    config.setdefault("amem", {})["residency"] = {"enabled": False}
    config.setdefault("sglang", {})["max_total_tokens"] = min(config["sglang"].get("max_total_tokens", 16384), 16384)
    if dtype:
        config["sglang"]["dtype"] = dtype
    path = out_dir / f"fidelity-config{'-' + dtype if dtype else ''}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


# One torch thread per benchmark server: on a shared 2-core machine the default (a thread per core,
# spinning) made a 135M model decode at 0.3-0.6 token/s when other processes ran; one thread: ~10x.
BENCH_THREADS = os.environ.get("OMP_NUM_THREADS", "1")


def start_bench_server(out: Path, dtype: str | None = None):
    from amem_sgl.local_server import free_port, start_server

    port = free_port()
    out.mkdir(parents=True, exist_ok=True)
    return start_server(f"{sys.executable} -m amem_sgl.launch_server --config {bench_config(out, dtype)} "
                        f"--port {port}", port=port, log_path=out / f"fidelity-server{'-' + dtype if dtype else ''}.log",
                        cwd=ROOT, env={"OMP_NUM_THREADS": BENCH_THREADS})


def model_layers(client: ChunkClient) -> int:
    """The served model's layer count (from its config.json)."""
    info = client._get("/get_model_info")
    return int(json.loads((Path(info["model_path"]) / "config.json").read_text())["num_hidden_layers"])


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0).replace(" ", "-")
    return f"cpu-{platform.machine()}-{os.cpu_count()}cores"


def write_run(out_dir: Path, name: str, quick: bool, data: dict, lines: list[str]) -> Path:
    """A benchmark run's ``<date>-<device>-<name>[-quick].{json,md}`` in ``out_dir``, the report printed;
    returns the stem."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"{dt.date.today().isoformat()}-{device_name()}-{name}{'-quick' if quick else ''}"
    stem.with_suffix(".json").write_text(json.dumps(data, indent=2))
    stem.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))
    print(f"wrote {stem}.json and {stem}.md")
    return stem


COLUMNS = ["n", "identical_answers", "numeric_floor", "answer_agreement", "reuse_accuracy", "full_accuracy",
           "accuracy_delta", "first_token_agreement", "first_token_kl", "recomputed_fraction", "mean_chunk_tokens",
           "prefill_ratio_full_over_reuse", "ttft_ratio_full_over_reuse", "escalation_rate", "spliced_fraction",
           "text_f1_vs_full"]


def _cell(value) -> str:
    return f"{value:.3f}" if isinstance(value, float) else ("-" if value is None else str(value))


def write_report(summary: dict, rows: list[Row], meta: dict, out_dir: Path, tag: str) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{dt.date.today().isoformat()}-{meta['device']}-{tag}"
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    targets = {g[: -len(" overall")]: target_gaps(s) for g, s in summary.items() if g.endswith(" overall")}
    floors = [r.floor_identical for r in rows if r.floor_identical is not None]
    floors = sum(floors) / len(floors) if floors else None
    sweep = guard_sweep([dataclasses.asdict(r) for r in rows], floors)
    json_path.write_text(json.dumps({"meta": meta, "summary": summary, "targets": targets, "guard_sweep": sweep,
                                     "rows": [dataclasses.asdict(r) for r in rows]}, indent=2))
    lines = [f"# Fidelity ({meta['set']} set, {meta['split']} split): {meta['policy']} vs full re-prefill "
             f"({meta['model']}, {meta['device']})", "",
             f"Command: `{meta['command']}`  ", f"Date: {meta['date']}, {meta['seconds']:.0f} s", "",
             "| group | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for group, s in summary.items():
        lines.append(f"| {group} | " + " | ".join(_cell(s.get(c)) for c in COLUMNS) + " |")
    lines += ["", "Targets (at the default: identical >= floor, agreement >= 0.99, |accuracy delta| <= 0.01):", "",
              "| policy | identical - floor | agreement - 0.99 | accuracy within 0.01 |", "|---|---|---|---|"]
    for policy, t in targets.items():
        lines.append(f"| {policy} | {_cell(t['identical_minus_floor'])} | {_cell(t['agreement_minus_0.99'])} | "
                     f"{t['accuracy_within_0.01']} |")
    for arm, found in sweep.items():
        lines += ["", f"Guard replayed over this run ({arm} margins, the exact arm for escalated questions, "
                  f"n={found['n']}; chosen = the smallest threshold reaching the floor: {found['chosen']}):", "",
                  "| threshold | escalation rate | identical | agreement | prefill ratio full/guarded |",
                  "|---|---|---|---|---|"]
        lines += [f"| {x['threshold']:g} | {x['escalation_rate']:.3f} | {x['identical_answers']:.3f} | "
                  f"{x['answer_agreement']:.3f} | {x['prefill_ratio_full_over_guarded']:.2f} |" for x in found["sweep"]]
    lines += ["", "identical_answers: greedy output ids equal; answer_agreement: normalised extracted answers equal; "
              "numeric_floor: fp32 vs bf16 full prefill on the same prompts (identical output ids); first_token_kl: "
              "KL(full || reuse) over the full arm's top-20 first tokens + the rest (a lower bound); "
              "recomputed_fraction: recomputed chunk tokens + probe layers, of a full prefill of the chunks; "
              "spliced_fraction: chunk tokens the compared request spliced (a blend arm far below 1 measured "
              "computed chunks, not reuse: e.g. its chunk nodes were evicted first); text_f1_vs_full: token F1 of "
              "the reuse answer's text against the full prefill's (the long-answer set's closeness measure)."]
    md_path.write_text("\n".join(lines) + "\n")
    return json_path, md_path


def run(url: str, dataset: str, n: int, seed: int, split: str, arms: list[str], max_new_tokens: int,
        out: Path, floor: bool, command: str, tag_suffix: str = "") -> tuple[Path, Path, dict]:
    """One fidelity run: every policy against the same full prefills (and the floor on the same prompts)."""
    t0 = time.monotonic()
    client = ChunkClient(url)
    items = load_items(dataset, n, seed, split)
    arms = [parse_arm(a, url) for a in arms]
    rows = evaluate(client, items, f"fidelity-{dataset}-{split}-{seed}", max_new_tokens, arms,
                    model_layers(client))
    if floor:
        from benchmarks import numeric_floor

        add_floor(rows, numeric_floor.replay_fp32(client, items, max_new_tokens, out))
    summary = summarize(rows)
    meta = {"set": dataset, "split": split, "n": n, "policy": ", ".join(a.label for a in arms),
            "model": "SmolLM2-135M-Instruct (bf16)", "device": device_name(),
            "date": dt.datetime.now().isoformat(timespec="seconds"), "seconds": time.monotonic() - t0,
            "max_new_tokens": max_new_tokens, "seed": seed, "numeric_floor": floor, "command": command}
    tag = "-".join(re.sub(r"[^a-z0-9.]", "", a.label) for a in arms)
    tag = tag if len(tag) <= 70 else f"{len(arms)}policies"
    set_tag = "" if dataset == "twohop" and split == "test" else f"{dataset}-" + ("" if split == "test" else "calib-")
    json_path, md_path = write_report(summary, rows, meta, out, f"fidelity-{set_tag}{tag}{tag_suffix}")
    return json_path, md_path, summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running amem server (default: start one)")
    parser.add_argument("--set", dest="dataset", default="main", choices=["main", "twohop", "long"],
                        help="main: single-fact lookups (default); twohop: the earlier one/two-hop city set; "
                             "long: free-form answers over the cost curve's memory (64 new tokens)")
    parser.add_argument("--split", default="test", choices=["test", "calibration"],
                        help="main set only: calibration is for tuning thresholds, never for reported figures")
    parser.add_argument("--n", type=int, default=120, help="questions (spread over the length bands)")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run for CI: 3 questions (one per band), 8 new tokens")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default 16 (long set: 64)")
    parser.add_argument("--policies", nargs="+", default=["none"],
                        help="arms to compare (each against the same full prefill): blend policies (none, all, "
                             "sink:K, tail:K, edges:K, hkvd:R[@L], ... -- the registry's), exact, and "
                             "guarded:M[/POLICY] (the fidelity guard at margin M), ctx:POLICY (context-aware chunk KV, "
                             "captured from a first use in another order, then POLICY)")
    parser.add_argument("--floor", action="store_true",
                        help="also replay the full prefills on an fp32 server (the numeric floor, same prompts)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    n, max_new_tokens = (3, 8) if args.quick else (args.n, args.max_new_tokens)
    if max_new_tokens is None:
        max_new_tokens = 64 if args.dataset == "long" else 16
    command = "python -m benchmarks.fidelity " + " ".join(argv if argv is not None else sys.argv[1:])
    server = None
    if args.url is None:
        server = start_bench_server(args.out)
        args.url = server.url
    try:
        for arm in args.policies:  # spelling errors before a server's time is spent
            parse_arm(arm, "http://127.0.0.1:0")
        json_path, md_path, _ = run(args.url, args.dataset, n, args.seed, args.split, args.policies, max_new_tokens,
                                    args.out, args.floor, command, "-quick" if args.quick else "")
        print(md_path.read_text())
        print(f"wrote {json_path} and {md_path}")
    finally:
        if server is not None:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
