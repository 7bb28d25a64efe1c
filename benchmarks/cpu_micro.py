"""Microbenchmarks of a memory turn's CPU pieces outside the model's own layers, each arm against its
alternative on the same inputs in one run (interleaved, medians; ratios are what to read):

* ``embed`` -- the recall query's embedding (MiniLM, one thread, as the server embeds it):
  ``amem.memory.embed_dtype`` float32 vs bfloat16 (autocast), and the two vectors' cosine; and
  bfloat16 with the embedder's linears on weights packed once (the default) vs plain autocast,
  vectors compared bit for bit; and the one-text path (the model's forward, the default) vs
  ``SentenceTransformer.encode``, bit for bit;
* ``keys`` -- one layer's extend attention over a memory turn's shape (74 query rows, ~830 keys whose
  slots come in 3 stretches of a 131K-slot pool, as a spliced request's do), keys read as slices vs
  one index gather (amem_sgl.blend.attention), two threads, times 30 layers; and a folded blend
  pass's shape (48 recomputed rows at scattered positions over the first 820 keys, then 31 extend
  rows over all 830): the recomputed rows in key groups (the default) vs one call over all keys;
* ``linear`` -- the model's linears (SmolLM2-135M's four per layer, 30 layers of distinct weights, so
  they are read from memory as in the server) at a decode step's, a memory turn's and a prefill's row
  counts, two threads: pre-packed oneDNN weights (amem_sgl.cpu_linear, ``amem.model.packed_linear``)
  vs ``F.linear``, outputs compared bit for bit;
  and the LM head's one row (SGLang's ``torch.matmul`` vs the packed weight);
* ``splice`` -- splice_kv of 780 chunk tokens in 4 chunks (one in place) over 30 layers of that
  pool, two threads: the rows moved as runs of slices (the default) vs index gathers.

    python -m benchmarks.cpu_micro            # ~1 min on 2 cores
    python -m benchmarks.cpu_micro --quick    # a smoke run (few repeats)

Writes ``benchmarks/results/<date>-<device>-cpu-micro.{json,md}``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import statistics
import time
import types
from pathlib import Path

import torch

from benchmarks.fidelity import device_name, write_run

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
QUERY = "Where does Alice Johnson live now, and which city did she move from last spring?"
POOL_SLOTS, LAYERS, KV_HEADS, HEADS, DIM = 131072, 30, 3, 9, 64  # SmolLM2-135M's KV layout
VOCAB = 49152  # SmolLM2-135M's vocabulary (its LM head rows)


def interleaved(arms: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each arm's callable, the arms alternated call by call (after a warm-up)."""
    for fn in arms.values():
        fn()
    times = {name: [] for name in arms}
    for _ in range(repeats):
        for name, fn in arms.items():
            started = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(ts) for name, ts in times.items()}


def bench_embed(repeats: int) -> dict:
    from amem_sgl.memory.store import Embedder

    torch.set_num_threads(1)
    arms = {"float32": Embedder(dtype="float32"), "bfloat16": Embedder(dtype="bfloat16", packed=False),
            "packed": Embedder(dtype="bfloat16")}
    packed = arms["packed"]

    def through_encode():  # the packed embedder's vector by SentenceTransformer.encode (batches' path)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            vector = packed.model.encode([QUERY], convert_to_tensor=True, show_progress_bar=False)
        return torch.nn.functional.normalize(vector.float(), dim=-1).numpy()

    calls = {d: (lambda e=e: e.encode([QUERY])) for d, e in arms.items()} | {"encode": through_encode}
    medians = interleaved(calls, repeats)
    vectors = {d: f() for d, f in calls.items()}
    cosine = float((vectors["float32"] * vectors["bfloat16"]).sum())
    return {"float32_ms": medians["float32"] * 1e3, "bfloat16_ms": medians["bfloat16"] * 1e3,
            "ratio": medians["float32"] / medians["bfloat16"], "cosine": cosine, "threads": 1,
            "packed_ms": medians["packed"] * 1e3, "packed_ratio": medians["bfloat16"] / medians["packed"],
            "packed_identical": bool((vectors["packed"] == vectors["bfloat16"]).all()), "packed_active": packed.packed,
            "encode_ms": medians["encode"] * 1e3, "direct_ratio": medians["encode"] / medians["packed"],
            "direct_identical": bool((vectors["packed"] == vectors["encode"]).all())}


def bench_keys(repeats: int, gen: torch.Generator) -> dict:
    from amem_sgl.blend.attention import extend_attention, plan_extend

    torch.set_num_threads(2)
    k_cache = torch.randn(POOL_SLOTS, KV_HEADS, DIM, generator=gen).bfloat16()
    v_cache = torch.randn(POOL_SLOTS, KV_HEADS, DIM, generator=gen).bfloat16()
    row = torch.cat([torch.arange(500, 530), torch.arange(60000, 60760), torch.arange(90000, 90040)])
    req_to_token = torch.zeros(1, 1024, dtype=torch.int32)
    req_to_token[0, : row.numel()] = row.int()
    kv, rows = row.numel(), 74
    args = (req_to_token, torch.tensor([0]), torch.tensor([kv]), torch.tensor([kv - rows]), torch.tensor([rows]))
    query = torch.randn(rows, HEADS, DIM, generator=gen).bfloat16()
    out = torch.empty_like(query)
    sliced = plan_extend(*args, None, torch.device("cpu"))
    gathered = dataclasses.replace(sliced, runs={})

    def layers(plan):
        for _ in range(LAYERS):
            extend_attention(query, out, k_cache, v_cache, *args, scaling=0.125, enable_gqa=True, plan=plan)

    medians = interleaved({"slices": lambda: layers(sliced), "gather": lambda: layers(gathered)}, repeats)
    return {"keys": kv, "query_rows": rows, "stretches": len(sliced.runs[0]), "slices_ms": medians["slices"] * 1e3,
            "gather_ms": medians["gather"] * 1e3, "ratio": medians["gather"] / medians["slices"], "threads": 2,
            "groups": bench_key_groups(repeats, k_cache, v_cache, req_to_token, kv, gen)}


def bench_key_groups(repeats: int, k_cache, v_cache, req_to_token, kv: int, gen: torch.Generator) -> dict:
    """A folded blend pass's attention: edges:8 rows of 3 spliced chunks (48, scattered over the first
    820 keys), then 31 extend rows over all ``kv``; recomputed rows in key groups vs one call."""
    from amem_sgl.blend import attention

    chunks = [(40, 195), (235, 195), (430, 195), (625, 195)]  # the first in place: not recomputed
    picked = sorted(p for s, n in chunks[1:] for p in [*range(s, s + 8), *range(s + n - 8, s + n)])
    end, tail = 820, 31
    positions = torch.cat([torch.tensor(picked), torch.arange(kv - tail, kv)])
    args = (req_to_token, torch.tensor([0, 0]), torch.tensor([end, kv]), torch.tensor([end - len(picked), kv - tail]),
            torch.tensor([len(picked), tail]))
    grouped = attention.plan_extend(*args, positions, torch.device("cpu"))
    keep, attention.key_groups = attention.key_groups, lambda visible, **_: [(0, len(visible), visible[-1])]
    try:
        whole = attention.plan_extend(*args, positions, torch.device("cpu"))
    finally:
        attention.key_groups = keep
    query = torch.randn(len(positions), HEADS, DIM, generator=gen).bfloat16()
    out = torch.empty_like(query)

    def layers(plan):
        for _ in range(LAYERS):
            attention.extend_attention(query, out, k_cache, v_cache, *args, scaling=0.125, enable_gqa=True,
                                       positions=positions, plan=plan)

    medians = interleaved({"groups": lambda: layers(grouped), "whole": lambda: layers(whole)}, repeats)
    return {"recomputed_rows": len(picked), "extend_rows": tail, "keys": kv,
            "groups": [(n, keys) for _, _, n, keys, _ in grouped.seqs[:-1]],
            "groups_ms": medians["groups"] * 1e3, "whole_ms": medians["whole"] * 1e3,
            "ratio": medians["whole"] / medians["groups"]}


LINEAR_ROWS = (1, 4, 26, 74, 800)  # decode step, session turn, query turn, blend pass, prefill


def bench_linear(repeats: int, gen: torch.Generator) -> dict:
    import torch.nn.functional as F

    from amem_sgl.cpu_linear import linear, supported

    if not supported():
        return {"supported": False}
    torch.set_num_threads(2)
    hidden, mlp = HEADS * DIM, 1536
    shapes = [(hidden + 2 * KV_HEADS * DIM, hidden), (hidden, hidden), (2 * mlp, hidden), (hidden, mlp)]
    weights = [[(torch.randn(o, i, generator=gen) * 0.05).bfloat16() for o, i in shapes] for _ in range(LAYERS)]
    packed = [[torch.ops.mkldnn._reorder_linear_weight(w) for w in layer] for layer in weights]
    rows = {}
    for m in LINEAR_ROWS:
        xs = [(torch.randn(m, i, generator=gen)).bfloat16() for _, i in shapes]
        same = all(torch.equal(F.linear(x, w), linear(x, p, None))
                   for x, w, p in zip(xs, weights[0], packed[0]))

        def plain():
            for layer in weights:
                for x, w in zip(xs, layer):
                    F.linear(x, w)

        def prepacked():
            for layer in packed:
                for x, p in zip(xs, layer):
                    linear(x, p, None)

        with torch.inference_mode():
            medians = interleaved({"packed": prepacked, "f_linear": plain}, repeats)
        rows[m] = {"packed_ms": medians["packed"] * 1e3, "f_linear_ms": medians["f_linear"] * 1e3,
                   "ratio": medians["f_linear"] / medians["packed"], "bit_identical": same}
    # The LM head (SmolLM2's tied 49152 x 576 embedding), one row as a turn's first token or a decode
    # step computes it: SGLang's plain torch.matmul(hidden, weight.T) vs the packed weight.
    head = (torch.randn(VOCAB, hidden, generator=gen) * 0.05).bfloat16()
    head_packed = torch.ops.mkldnn._reorder_linear_weight(head)
    x = torch.randn(1, hidden, generator=gen).bfloat16()
    with torch.inference_mode():
        medians = interleaved({"packed": lambda: linear(x, head_packed, None), "matmul": lambda: torch.matmul(x, head.T)},
                              repeats)
    lm_head = {"packed_ms": medians["packed"] * 1e3, "matmul_ms": medians["matmul"] * 1e3,
               "ratio": medians["matmul"] / medians["packed"],
               "bit_identical": bool(torch.equal(torch.matmul(x, head.T), linear(x, head_packed, None)))}
    return {"supported": True, "layers": LAYERS, "threads": 2, "rows": rows, "lm_head": lm_head}


def bench_splice(repeats: int, gen: torch.Generator) -> dict:
    from amem_sgl.cache.splice import RopeSpec, splice_kv

    torch.set_num_threads(2)
    ks = [torch.randn(POOL_SLOTS, KV_HEADS, DIM, generator=gen).bfloat16() for _ in range(LAYERS)]
    vs = [torch.randn(POOL_SLOTS, KV_HEADS, DIM, generator=gen).bfloat16() for _ in range(LAYERS)]
    pool = types.SimpleNamespace(start_layer=0, layer_num=LAYERS, get_key_buffer=ks.__getitem__,
                                 get_value_buffer=vs.__getitem__)
    inv = 1.0 / (10000 ** (torch.arange(0, DIM, 2, dtype=torch.float32) / DIM))
    freqs = torch.arange(8192, dtype=torch.float32)[:, None] * inv[None, :]
    rope = RopeSpec(torch.nn.Identity(), torch.cat([freqs.cos(), freqs.sin()], dim=-1), DIM, DIM, True)
    pieces = [(1000, 90000, 195, 0), (40000, 90195, 195, 17), (70000, 90390, 195, 290), (100000, 90585, 195, 480)]
    src = torch.cat([torch.arange(s, s + n) for s, _, n, _ in pieces])
    dst = torch.cat([torch.arange(d, d + n) for _, d, n, _ in pieces])
    delta = torch.cat([torch.full((n,), dl, dtype=torch.int64) for _, _, n, dl in pieces])
    from amem_sgl.cache import splice

    def by_index():  # every row by index gathers (as rows that form no runs are moved)
        keep, splice.MAX_SPLICE_RUNS = splice.MAX_SPLICE_RUNS, 0
        try:
            splice_kv(pool, src, dst, delta, rope)
        finally:
            splice.MAX_SPLICE_RUNS = keep

    medians = interleaved({"splice": lambda: splice_kv(pool, src, dst, delta, rope), "index": by_index}, repeats)
    return {"tokens": int(src.numel()), "layers": LAYERS, "splice_ms": medians["splice"] * 1e3, "threads": 2,
            "index_ms": medians["index"] * 1e3, "ratio": medians["index"] / medians["splice"]}


def linear_lines(lin: dict) -> list[str]:
    if not lin.get("supported"):
        return ["| model linears | packed | not supported on this CPU/torch | | | |"]
    return [f"| model linears, {m} rows x 4 x {lin['layers']} layers (2 threads) | packed | {r['packed_ms']:.2f} | "
            f"F.linear | {r['f_linear_ms']:.2f} | {r['ratio']:.2f}x ({'bit-identical' if r['bit_identical'] else 'DIFFERENT'}) |"
            for m, r in lin["rows"].items()] + [
        f"| LM head, 1 row x {VOCAB} x {HEADS * DIM} (2 threads) | packed | {lin['lm_head']['packed_ms']:.2f} | "
        f"torch.matmul | {lin['lm_head']['matmul_ms']:.2f} | {lin['lm_head']['ratio']:.2f}x "
        f"({'bit-identical' if lin['lm_head']['bit_identical'] else 'DIFFERENT'}) |"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: 3 repeats")
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    repeats = 3 if args.quick else args.repeats
    gen = torch.Generator().manual_seed(0)
    started = time.monotonic()
    data = {"meta": {"device": device_name(), "date": dt.datetime.now().isoformat(timespec="seconds"),
                     "repeats": repeats, "quick": args.quick},
            "embed": bench_embed(repeats), "keys": bench_keys(repeats, gen), "linear": bench_linear(repeats, gen),
            "splice": bench_splice(repeats, gen)}
    data["meta"]["seconds"] = round(time.monotonic() - started, 1)
    e, k, s = data["embed"], data["keys"], data["splice"]
    g = k["groups"]
    lines = [f"# CPU pieces of a memory turn ({device_name()})", "",
             f"Command: `python -m benchmarks.cpu_micro{' --quick' if args.quick else ''}`  ",
             f"Date: {data['meta']['date']}, {data['meta']['seconds']} s; medians of {repeats}, arms interleaved", "",
             "| piece | arm | ms | other arm | ms | ratio |", "|---|---|---|---|---|---|",
             f"| recall query embedding (1 thread) | bfloat16 | {e['bfloat16_ms']:.2f} | float32 | "
             f"{e['float32_ms']:.2f} | {e['ratio']:.2f}x (cosine {e['cosine']:.6f}) |",
             f"| recall query embedding (1 thread) | bfloat16, packed linears | {e['packed_ms']:.2f} | bfloat16 | "
             f"{e['bfloat16_ms']:.2f} | {e['packed_ratio']:.2f}x ({'bit-identical' if e['packed_identical'] else 'DIFFERENT'}"
             f"{'' if e['packed_active'] else ', NOT PACKED: this CPU cannot'}) |",
             f"| recall query embedding (1 thread) | one text: the model's forward | {e['packed_ms']:.2f} | "
             f"SentenceTransformer.encode | {e['encode_ms']:.2f} | {e['direct_ratio']:.2f}x "
             f"({'bit-identical' if e['direct_identical'] else 'DIFFERENT'}) |",
             f"| extend attention, {k['query_rows']} rows x {k['keys']} keys in {k['stretches']} stretches, "
             f"30 layers (2 threads) | slices | {k['slices_ms']:.2f} | gather | {k['gather_ms']:.2f} | {k['ratio']:.2f}x |",
             f"| {g['recomputed_rows']} recomputed rows at scattered positions + {g['extend_rows']} extend rows, "
             f"{g['keys']} keys, 30 layers (2 threads) | key groups {g['groups']} | {g['groups_ms']:.2f} | one call | "
             f"{g['whole_ms']:.2f} | {g['ratio']:.2f}x |",
             *linear_lines(data["linear"]),
             f"| splice_kv, {s['tokens']} tokens in 4 chunks x {s['layers']} layers (2 threads) | runs of slices | "
             f"{s['splice_ms']:.2f} | index gathers | {s['index_ms']:.2f} | {s['ratio']:.2f}x |", ""]
    write_run(args.out, "cpu-micro", args.quick, data, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
