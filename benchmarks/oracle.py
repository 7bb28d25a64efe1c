"""The oracle bound of chunk-KV reuse (benchmark-only: it needs the full prefill's own KV).

A transformers emulation (fp32, SmolLM2-135M from the converted folder) of the server's splice:
each chunk's KV is computed behind the chat preamble (its canonical context, as the harness
registers it), its keys re-rotated to the chunk's position in the prompt (RoPE by the position
difference, the math of kernels/rope_rerotate.py's reference), the preamble is an exact prefix hit,
and the question is computed over that cache and answered greedily. The oracle then gives the
top-X% most-deviated chunk tokens (sum over layers of |K - K_full|^2 + |V - V_full|^2, against the
full prefill of the same prompt) the full prefill's **exact** KV: no selection rule that recomputes
X% of the tokens can do better than exact KV at the most-deviated ones, so identical answers at X%
bound every policy at that budget. Also measured, with the same exact-KV replacement:

* ``context`` -- context-aware chunk KV (FusionRAG): each chunk's KV computed behind the item's
  other chunks (in reversed order) instead of the preamble alone, then spliced the same way;
* rules -- the server's selection rules applied to exact KV: ``edges:8`` (first and last 8 tokens of
  every chunk) and ``hkvd`` (the top-R tokens by key deviation at layer 1, the server probe's check
  layer), at the budgets the server's policies spend.

Identical = the same greedy output ids as this emulation's own full prefill (same weights, fp32):
what the splice loses, without the serving numerics. ``--against`` a fidelity result puts each
server policy next to the oracle at its recompute budget.

    python -m benchmarks.oracle --set main --n 30
    python -m benchmarks.oracle --set twohop --n 30 --against benchmarks/results/<fidelity run>.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from benchmarks.fidelity import device_name, load_items
from benchmarks.fidelity_metrics import answer_of

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
BUDGETS = (0.0, 0.15, 0.30, 0.50, 0.80)


def load_model(threads: int | None = None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from amem_sgl.chunks.client import ChatLayout
    from amem_sgl.models import ensure_embedded_model

    if threads:
        torch.set_num_threads(threads)
    path = ensure_embedded_model()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, ChatLayout.from_tokenizer(tokenizer)


def _forward(model, ids: list[int], start: int = 0, past=None):
    """Logits and cache of ``ids`` at positions start.. (over ``past`` when given)."""
    x = torch.tensor([ids])
    pos = torch.arange(start, start + len(ids))[None]
    out = model(input_ids=x, position_ids=pos, past_key_values=past, use_cache=True)
    return out.logits[0, -1], out.past_key_values


def _kv(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys, layer.values) for layer in cache.layers]


def rerotate(keys: torch.Tensor, delta: int, model) -> torch.Tensor:
    """Keys [1, heads, n, dim] rotated by ``delta`` positions (RoPE composes: R(a+d) = R(d) R(a))."""
    if delta == 0:
        return keys
    pos = torch.full((1, keys.shape[2]), delta)
    cos, sin = model.model.rotary_emb(keys, pos)
    cos, sin = cos[:, None], sin[:, None]
    half = keys.shape[-1] // 2
    rotated = torch.cat((-keys[..., half:], keys[..., :half]), dim=-1)
    return keys * cos + rotated * sin


def _greedy(model, logits, past, length: int, max_new_tokens: int, eos: int) -> list[int]:
    out = []
    for step in range(max_new_tokens):
        token = int(torch.argmax(logits))
        if token == eos:
            break
        out.append(token)
        if step + 1 < max_new_tokens:
            logits, past = _forward(model, [token], length + step, past)
    return out


def _cache_from(kv: list[tuple[torch.Tensor, torch.Tensor]]):
    from transformers import DynamicCache

    cache = DynamicCache()
    for layer, (k, v) in enumerate(kv):
        cache.update(k.clone(), v.clone(), layer)
    return cache


def chunk_kv(model, layout, chunks: list[list[int]], spans, context: bool):
    """Per layer: the chunks' spliced K and V at their prompt positions ([1, heads, sum(chunks), dim]).

    Canonical context: the preamble (``context=False``) or the preamble + the item's other chunks
    in reversed order (FusionRAG-style); keys re-rotated from where they were computed to the span."""
    pre = list(layout.preamble)
    per_layer: list[tuple[list, list]] | None = None
    for i, (chunk, (start, _)) in enumerate(zip(chunks, spans)):
        before = pre + ([t for j in reversed(range(len(chunks))) if j != i for t in chunks[j]] if context else [])
        with torch.no_grad():
            _, cache = _forward(model, before + chunk)
        kv = _kv(cache)
        per_layer = per_layer or [([], []) for _ in kv]
        for layer, (k, v) in enumerate(kv):
            per_layer[layer][0].append(rerotate(k[:, :, len(before):], start - len(before), model))
            per_layer[layer][1].append(v[:, :, len(before):])
    return [(torch.cat(ks, dim=2), torch.cat(vs, dim=2)) for ks, vs in per_layer]


def answer_with(model, full_kv, spliced, chunk_pos: torch.Tensor, exact: torch.Tensor, suffix: list[int],
                end: int, max_new_tokens: int, eos: int) -> list[int]:
    """Greedy answer over [preamble: exact][chunks: spliced, ``exact`` of them the full KV][suffix]."""
    kv = []
    for (fk, fv), (sk, sv) in zip(full_kv, spliced):
        k, v = fk[:, :, :end].clone(), fv[:, :, :end].clone()
        keep = chunk_pos[~exact]
        k[:, :, keep], v[:, :, keep] = sk[:, :, ~exact], sv[:, :, ~exact]
        kv.append((k, v))
    with torch.no_grad():
        logits, past = _forward(model, suffix, end, _cache_from(kv))
        return _greedy(model, logits, past, end + len(suffix), max_new_tokens, eos)


def top_fraction(score: torch.Tensor, fraction: float) -> torch.Tensor:
    mask = torch.zeros_like(score, dtype=torch.bool)
    k = round(fraction * len(score))
    if k:
        mask[torch.topk(score, k).indices] = True
    return mask


def edges_mask(spans, k: int) -> torch.Tensor:
    parts = []
    for start, end in spans:
        m = torch.zeros(end - start, dtype=torch.bool)
        m[:k], m[-k:] = True, True
        parts.append(m)
    return torch.cat(parts)


def evaluate_item(model, layout, q, max_new_tokens: int, budgets, hkvd_ratios) -> dict:
    eos = layout.tokenizer.eos_token_id
    chunks = [layout.tokens(c) for c in q.chunks]
    prompt = layout.compose(chunks, q.prompt)
    end = prompt.spans[-1][1]
    suffix = prompt.input_ids[end:]
    chunk_pos = torch.cat([torch.arange(s, e) for s, e in prompt.spans])
    with torch.no_grad():
        logits, cache = _forward(model, prompt.input_ids)
        full_ids = _greedy(model, logits, cache, len(prompt.input_ids), max_new_tokens, eos)
    full_kv = [(k.clone(), v.clone()) for k, v in _kv(cache)]
    result = {"qid": q.qid, "band": q.band, "hops": q.hops, "chunk_tokens": len(chunk_pos),
              "full_answer": layout.tokenizer.decode(full_ids), "full_correct": answer_of(
                  layout.tokenizer.decode(full_ids)) == q.gold.lower(), "identical": {}, "answer_agree": {}}

    def record(name: str, spliced, exact):
        ids = answer_with(model, full_kv, spliced, chunk_pos, exact, suffix, end, max_new_tokens, eos)
        text = layout.tokenizer.decode(ids)
        result["identical"][name] = ids == full_ids
        result["answer_agree"][name] = answer_of(text) == answer_of(result["full_answer"])

    for kind, context in (("preamble", False), ("context", True)):
        spliced = chunk_kv(model, layout, chunks, prompt.spans, context)
        dev = sum(((fk[0, :, chunk_pos] - sk[0]) ** 2).sum((0, 2)) + ((fv[0, :, chunk_pos] - sv[0]) ** 2).sum((0, 2))
                  for (fk, fv), (sk, sv) in zip(full_kv, spliced))
        for b in budgets:
            record(f"{kind} oracle@{b:.0%}", spliced, top_fraction(dev, b))
        if kind == "preamble":
            key_dev = ((full_kv[1][0][0, :, chunk_pos] - spliced[1][0][0]) ** 2).sum((0, 2))
            for r in hkvd_ratios:
                record(f"preamble hkvd-rule:{r:g}", spliced, top_fraction(key_dev, r))
            record("preamble edges-rule:8", spliced, edges_mask(prompt.spans, 8))
    return result


def summarize(rows: list[dict]) -> dict:
    out = {}
    for name in rows[0]["identical"]:
        for band in ("overall", "short", "medium", "long"):
            group = [r for r in rows if band == "overall" or r["band"] == band]
            if group:
                out[f"{name} {band}"] = {"n": len(group),
                                         "identical_answers": sum(r["identical"][name] for r in group) / len(group),
                                         "answer_agreement": sum(r["answer_agree"][name] for r in group) / len(group)}
    out["full_accuracy"] = sum(r["full_correct"] for r in rows) / len(rows)
    return out


def against(summary: dict, fidelity_json: Path) -> list[dict]:
    """Each server policy of a fidelity run next to the oracle at (the budget nearest above) its
    recompute fraction, and its own rule on exact KV when measured."""
    data = json.loads(fidelity_json.read_text())
    rows = []
    for group, s in data["summary"].items():
        if not group.endswith(" overall"):
            continue
        policy, spent = group[: -len(" overall")], s["recomputed_fraction"]
        above = [b for b in BUDGETS if b >= spent - 1e-9]
        budget = above[0] if above else None
        oracle = summary.get(f"preamble oracle@{budget:.0%} overall") if budget is not None else None
        rows.append({"policy": policy, "recomputed_fraction": spent, "identical_answers": s["identical_answers"],
                     "oracle_budget": budget, "oracle_identical": oracle and oracle["identical_answers"]})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", dest="dataset", default="main", choices=["main", "twohop"])
    parser.add_argument("--n", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--hkvd", type=float, nargs="*", default=[0.08], help="hkvd rule ratios on exact KV")
    parser.add_argument("--against", type=Path, help="a fidelity run (JSON) whose policies to compare")
    parser.add_argument("--quick", action="store_true", help="3 questions (a smoke run)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    n = 3 if args.quick else args.n
    t0 = time.monotonic()
    model, layout = load_model(args.threads)
    items = load_items(args.dataset, n, args.seed)
    rows = [evaluate_item(model, layout, q, args.max_new_tokens, BUDGETS, args.hkvd)
            for q in tqdm(items, desc="oracle", file=sys.stderr)]
    summary = summarize(rows)
    compared = against(summary, args.against) if args.against else []
    meta = {"set": args.dataset, "n": n, "seed": args.seed, "model": "SmolLM2-135M-Instruct (transformers, fp32)",
            "device": device_name(), "date": dt.datetime.now().isoformat(timespec="seconds"),
            "seconds": time.monotonic() - t0, "max_new_tokens": args.max_new_tokens,
            "command": "python -m benchmarks.oracle " + " ".join(argv if argv is not None else sys.argv[1:])}
    stem = args.out / f"{dt.date.today().isoformat()}-{meta['device']}-oracle-{args.dataset}{'-quick' if args.quick else ''}"
    args.out.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "summary": summary, "against": compared,
                                                     "rows": rows}, indent=2))
    lines = [f"# Oracle bound of chunk-KV reuse ({args.dataset} set, {meta['model']}, {meta['device']})", "",
             f"Command: `{meta['command']}`  ", f"Date: {meta['date']}, {meta['seconds']:.0f} s; "
             f"full-prefill accuracy {summary['full_accuracy']:.3f}", "",
             "| variant | band | n | identical answers | answer agreement |", "|---|---|---|---|---|"]
    for key, s in summary.items():
        if isinstance(s, dict):
            name, band = key.rsplit(" ", 1)
            lines.append(f"| {name} | {band} | {s['n']} | {s['identical_answers']:.3f} | {s['answer_agreement']:.3f} |")
    if compared:
        lines += ["", f"Server policies ({args.against.name}) against the oracle at the budget at or above their "
                  "recompute:", "", "| policy | recompute | identical (server) | oracle budget | oracle identical |",
                  "|---|---|---|---|---|"]
        for c in compared:
            lines.append(f"| {c['policy']} | {c['recomputed_fraction']:.3f} | {c['identical_answers']:.3f} | "
                         f"{c['oracle_budget']} | {c['oracle_identical']} |")
    lines += ["", "preamble: chunk KV behind the chat preamble (the server's registration); context: behind the "
              "item's other chunks (reversed order); oracle@X: the X most-deviated chunk tokens get the full "
              "prefill's exact KV; hkvd-rule / edges-rule: the server's selection rules on exact KV."]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
