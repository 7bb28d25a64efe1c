"""The cost curve: an agent session over a large memory, three arms in one run.

Memory: >= 200 chunks (user facts, ``--facts-per-chunk`` to a chunk, and document passages).
Session: 30 turns; each turn asks about one of a few topics, and the topic drifts slowly, so the recalled working set (top-k) changes a
little between turns. Arms, same model, same questions, same machine:

1. ``text``    -- text memory on plain SGLang (``--radix-cache-backend ''``: its built-in RadixCache):
                  the recalled chunk texts are re-sent in the prompt every turn;
2. ``query``   -- amem per query: OpenAI chat with ``user`` = namespace; recall, splice + blend
                  (server default policy) every turn;
3. ``session`` -- amem session: the working set pinned and warmed once, every turn reuses its
                  blended prefix.

Per turn: prefilled tokens (prompt tokens not served from cache, plus recomputed ones, plus a session's
warm-up when it is (re)pinned), TTFT (streamed, wall clock), its phases (``usage.amem.timings``, a
mean per arm: benchmarks.ttft_phases) and the answer. Reported: cumulative prefill and TTFT, ratios per query and
over the session, break-even in queries with the one-time chunk prefill counted against arms 2/3
(as the server counted it: all remembered chunks with ``--prefill remember``, none with
``first_use``, where it is inside the turns; and only the chunks the session used), answer agreement
between arms and accuracy (the answer names the asked person's city).
Writes ``benchmarks/results/<date>-<device>-cost-curve-<prefill>[-<level>]-f<facts>.{json,md,png}``, updates ``latest.json``.

    python -m benchmarks.cost_curve            # full: 2 servers + an fp32 one for the floor, 240 chunks, 30 turns (~12 min, 2 CPU cores)
    python -m benchmarks.cost_curve --quick    # smoke: 1 server, 40 chunks, 6 turns (< 3 min)
    python -m benchmarks.cost_curve --fidelity exact,fast   # the memory arms at each level, one report each
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import requests
from tqdm.auto import tqdm

from amem_sgl.local_server import amem_state, free_port, start_server
from amem_sgl.sdk import Amem
from benchmarks import numeric_floor as numeric_floor_runs
from benchmarks.fidelity import device_name
from benchmarks.cost_curve_data import TOPICS, make_memory, topic_changed, turn_questions  # noqa: F401
from benchmarks.cost_curve_plot import plot, replot  # noqa: F401 -- re-exported
from benchmarks.cost_curve_servers import amem_config, default_setting, flush_cache, numeric_floor  # noqa: F401
from benchmarks.ttft_phases import breakdown, table

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
@dataclasses.dataclass
class Turn:
    arm: str
    turn: int
    prompt_tokens: int
    cached_tokens: int
    recomputed_tokens: int
    prefilled_tokens: int
    ttft_s: float
    answer: str
    chunks: list[str]
    correct: bool = False  # the answer names a city the memory connects the asked person to
    timings: dict = dataclasses.field(default_factory=dict)  # usage.amem.timings (memory arms)


def chat(url: str, body: dict, headers: dict | None = None) -> tuple[dict, float, str, list[str]]:
    """Streamed chat turn: (usage, ttft, text, chunk ids from the header)."""
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first, text, usage = None, [], {}
    with requests.post(f"{url}/v1/chat/completions", json=body, headers=headers or {}, stream=True, timeout=600) as reply:
        reply.raise_for_status()
        chunk_ids = [c for c in reply.headers.get("x-amem-chunks", "").split(",") if c]
        for line in reply.iter_lines():
            if not line.startswith(b"data:") or line.strip() == b"data: [DONE]":
                continue
            event = json.loads(line[5:])
            if event.get("choices") and event["choices"][0].get("delta", {}).get("content"):
                first = first or time.perf_counter()
                text.append(event["choices"][0]["delta"]["content"])
            if event.get("usage"):
                usage = event["usage"]
    return usage, (first or time.perf_counter()) - t0, "".join(text), chunk_ids


def run_arms(amem_url: str, text_url: str, n_chunks: int, turns: int, k: int, max_tokens: int,
             facts_per_chunk: int = 8, fidelity: str | None = None) -> dict:
    memory = Amem(amem_url)
    # The fidelity level the memory arms ask for each turn (None: the server's default).
    level = {"amem_fidelity": fidelity} if fidelity else {}
    # Arms 2 and 3 get a namespace each (same texts), so neither reuses the other's blended prefixes.
    tag = f"{fidelity + '-' if fidelity else ''}{int(time.time())}"
    namespace, session_ns = f"cost-q-{tag}", f"cost-s-{tag}"
    texts, questions, gold = make_memory(n_chunks, facts_per_chunk)
    # The one-time chunk prefill, as the server counts it (0 when chunks are prefilled on first use:
    # then that cost is inside the turns' prefill).
    before = int(amem_state(amem_url)["stats"].get("registered_tokens", 0))
    t0 = time.perf_counter()
    remembered = memory.remember(namespace, texts)
    remember_s = time.perf_counter() - t0
    one_time = int(amem_state(amem_url)["stats"].get("registered_tokens", 0)) - before
    memory.remember(session_ns, texts)
    listed = memory.list(namespace)
    chunk_tokens = {c.id: c.tokens for c in listed}
    order = {c.id: i for i, c in enumerate(listed)}
    asks = turn_questions(questions, turns)
    system = "You are a helpful assistant. Notes from memory follow; use them when they are relevant to the question."
    rows: list[Turn] = []
    text_bodies: list[dict] = []  # arm 1's requests, replayed on an fp32 server for the numeric floor
    session = None
    for t, question in enumerate(tqdm(asks, desc="cost curve", unit="turn", file=sys.stderr)):
        # 1. text memory: recall (same retriever), texts re-sent in the prompt, plain SGLang serves it.
        recalled = sorted(memory.search(namespace, question, k), key=lambda c: order[c.id])
        # The same text the memory layer composes: system prompt, then each chunk followed by a newline.
        notes = "".join(c.text + "\n" for c in recalled)
        text_body = {"model": "default", "max_tokens": max_tokens, "temperature": 0,
                     "messages": [{"role": "system", "content": f"{system}\n{notes}"},
                                  {"role": "user", "content": question}]}
        text_bodies.append(text_body)
        usage, ttft, answer, _ = chat(text_url, text_body)
        rows.append(_row("text", t, usage, ttft, answer, [c.id for c in recalled]))
        # 2. amem per query.
        before = blend_counters(amem_url)
        usage, ttft, answer, used = chat(amem_url, {"model": "default", "user": namespace, "max_tokens": max_tokens,
                                                    "temperature": 0, **level,
                                                    "messages": [{"role": "user", "content": question}]})
        rows.append(_row("query", t, usage, ttft, answer, used, blend_counters(amem_url, before)))
        # 3. amem session (pinned at the first turn's recall; re-pinned when the topic drifts away).
        # Warming the working set is this turn's cost too: its prefill and recompute are added.
        warm = {}
        if session is None or topic_changed(asks, t):
            before = blend_counters(amem_url)
            # a wider pinned set, warmed at the turns' level (an exact warm-up would not serve fast turns)
            session = memory.start_session(session_ns, query=question, k=2 * k, fidelity=fidelity)
            warm = {**blend_counters(amem_url, before), "prefilled": session.warm.get("prompt_tokens", 0)
                    - session.warm.get("cached_tokens", 0)}
        before = blend_counters(amem_url)
        usage, ttft, answer, used = chat(amem_url, {"model": "default", "max_tokens": max_tokens, "temperature": 0,
                                                    **level, "messages": [{"role": "user", "content": question}]},
                                         {"X-Amem-Session": session.session_id})
        rows.append(_row("session", t, usage, ttft, answer, used, blend_counters(amem_url, before), warm))
    mark_correct(rows, asks, gold)
    used_chunks = {c for r in rows if r.arm != "text" for c in r.chunks}
    used_tokens = sum(chunk_tokens.get(c, 0) for c in used_chunks)
    return {"rows": rows, "one_time_prefill_all": one_time,
            # what registering only the chunks the session used would have cost (or less, if less was)
            "one_time_prefill_used": min(one_time, used_tokens),
            "chunks": len(remembered.ids), "remember_s": remember_s, "turns": turns, "k": k,
            "text_bodies": text_bodies}


def blend_counters(url: str, before: dict | None = None) -> dict:
    """The server's recompute counters (or their change since ``before``): streamed responses carry
    no usage.amem, and turns run one at a time, so the change is this turn's."""
    stats = amem_state(url)["stats"]
    keys = ("recomputed_tokens", "gap_tokens", "probed_tokens")
    now = {k: int(stats.get(k, 0)) for k in keys}
    return now if before is None else {k: now[k] - before[k] for k in keys}


def _row(arm, t, usage, ttft, answer, chunks, counters: dict | None = None, warm: dict | None = None) -> Turn:
    prompt = int(usage.get("prompt_tokens", 0))
    cached = int((usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0))
    # SGLang counts spliced tokens as cached; what the blend pass computed is added back (a probe's
    # early layers count as (layers run / all layers) of a token; no probe with the default policy).
    counters, warm = counters or {}, warm or {}
    recomputed = sum(c.get("recomputed_tokens", 0) + c.get("gap_tokens", 0) for c in (counters, warm))
    prefilled = prompt - cached + recomputed + warm.get("prefilled", 0)
    timings = (usage.get("amem") or {}).get("timings") or {}
    return Turn(arm, t, prompt, cached, recomputed, prefilled, ttft, answer, chunks, timings=timings)


def mark_correct(rows: list[Turn], asks: list[str], gold: dict[str, set[str]]) -> None:
    for row in rows:
        row.correct = any(city in row.answer for city in gold.get(asks[row.turn], ()))


def summarize(result: dict) -> dict:
    rows: list[Turn] = result["rows"]
    by = {arm: [r for r in rows if r.arm == arm] for arm in ("text", "query", "session")}
    cum = {arm: sum(r.prefilled_tokens for r in rs) for arm, rs in by.items()}
    ttft = {arm: sum(r.ttft_s for r in rs) for arm, rs in by.items()}
    n = len(by["text"])

    def break_even(arm: str, one_time: int) -> int | None:
        a = b = 0
        for q in range(n):
            a += by["text"][q].prefilled_tokens
            b += by[arm][q].prefilled_tokens
            if b + one_time <= a:
                return q + 1
        return None

    # Like with like: the turns where the memory arm used exactly arm 1's chunks (same k, same recall).
    same_chunks = sum(sorted(p.chunks) == sorted(q.chunks) for p, q in zip(by["query"], by["text"]))
    agree = lambda x, y: sum(p.answer == q.answer for p, q in zip(by[x], by[y])) / max(n, 1)  # noqa: E731
    recomputed = sum(r.recomputed_tokens for r in by["query"])
    return {
        "turns": n, "chunks": result["chunks"],
        "turns_with_arm1_chunks": {"query": same_chunks, "of": n},
        "cumulative_prefill_tokens": cum, "cumulative_ttft_s": ttft,
        "prefill_ratio_per_query": cum["text"] / max(cum["query"], 1),
        "prefill_ratio_session": cum["text"] / max(cum["session"], 1),
        "ttft_ratio_per_query": ttft["text"] / max(ttft["query"], 1e-9),
        "ttft_ratio_session": ttft["text"] / max(ttft["session"], 1e-9),
        # The same ratio of per-turn medians: a turn slowed by other work on a shared machine moves
        # the sums above a lot and the medians little (both are reported; the target is the first).
        "ttft_ratio_median": {arm: statistics.median(r.ttft_s for r in by["text"])
                              / max(statistics.median(r.ttft_s for r in by[arm]), 1e-9)
                              for arm in ("query", "session")} if n else {},
        "break_even_queries": {"per_query_all_chunks": break_even("query", result["one_time_prefill_all"]),
                               "session_all_chunks": break_even("session", result["one_time_prefill_all"]),
                               "per_query_used_chunks": break_even("query", result["one_time_prefill_used"]),
                               "session_used_chunks": break_even("session", result["one_time_prefill_used"])},
        "one_time_prefill_tokens": {"all": result["one_time_prefill_all"], "used": result["one_time_prefill_used"]},
        "answer_agreement": {"query_vs_text": agree("query", "text"), "session_vs_text": agree("session", "text"),
                             "session_vs_query": agree("session", "query")},
        "recompute_fraction": recomputed / max(sum(r.prompt_tokens for r in by["query"]), 1),
        # The answer names the asked person's city (from memory), per arm; and how often an arm is
        # right or wrong on the same turns as arm 1.
        "accuracy": {arm: sum(r.correct for r in rs) / max(n, 1) for arm, rs in by.items()},
        "correctness_agreement": {arm: sum(p.correct == q.correct for p, q in zip(by[arm], by["text"])) / max(n, 1)
                                  for arm in ("query", "session")},
        # Mean seconds per TTFT phase and arm (usage.amem.timings; the text arm has TTFT only).
        "ttft_breakdown": breakdown(rows, ("text", "query", "session")),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 server, 40 chunks, 6 turns: a smoke run")
    parser.add_argument("--chunks", type=int, default=240)
    parser.add_argument("--turns", type=int, default=30)
    parser.add_argument("-k", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--facts-per-chunk", type=int, default=16,
                        help="user facts per memory chunk (1: a ~20-token chunk per fact)")
    parser.add_argument("--blend", default=None,
                        help="amem.blend.policy of the amem server started here, e.g. all (default: the config's)")
    parser.add_argument("--fidelity", type=_levels, default=[None], metavar="LEVEL[,LEVEL...]",
                        help="fidelity level (exact|guarded|fast) the query and session arms ask for each turn "
                             "(body field amem_fidelity; default: the server's own, amem.blend.fidelity); several, "
                             "comma-separated, run the arms once per level on the same servers, a report each")
    parser.add_argument("--prefill", choices=("remember", "first_use"), default=None,
                        help="amem.memory.prefill of the amem server started here (default: configs/default.yaml's)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--url", default=None, help="use this running amem server for every arm (no server started)")
    parser.add_argument("--numeric-floor", type=float, default=None,
                        help="fp32-vs-bf16 identical-answer rate to record beside answer agreement "
                             "(default: the latest numeric-floor result in --out)")
    args = parser.parse_args(argv)
    if args.quick:
        args.chunks, args.turns = 40, 6
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="amem-cost-curve-"))
    env = {"AMEM_SGL_RESIDENCY_DIR": str(work / "residency"), "AMEM_SGL_MEMORY_DIR": str(work / "memory")}
    t0 = time.monotonic()
    servers = []
    try:
        if args.url:
            results = {level: run_arms(args.url, args.url, args.chunks, args.turns, args.k, args.max_tokens,
                                       args.facts_per_chunk, level) for level in args.fidelity}
        else:
            results = _run_with_servers(args, env, servers)
    finally:
        for server in servers:
            server.stop()
    for i, (level, result) in enumerate(results.items()):
        report(args, argv, level, result, t0, latest_too=i == 0)
    return 0


def _levels(text: str) -> list[str | None]:
    levels = [v.strip() for v in text.split(",") if v.strip()]
    if not levels or set(levels) - {"exact", "guarded", "fast"}:
        raise argparse.ArgumentTypeError(f"fidelity levels are exact, guarded, fast; got {text!r}")
    return levels


def report(args, argv, level: str | None, result: dict, t0: float, latest_too: bool) -> None:
    """One level's JSON, MD and plot (and latest.json for the first level asked for)."""
    summary = summarize(result)
    if "floor" in result:
        floor, floor_source = result["floor"], "this run's prompts: arm 1 again in fp32 vs bf16"
    elif args.numeric_floor is not None:
        floor, floor_source = args.numeric_floor, "--numeric-floor"
    else:
        floor, floor_source = numeric_floor_runs.latest(args.out), "the latest numeric_floor run (fidelity questions)"
    device = device_name()
    meta = {"device": device, "model": "SmolLM2-135M-Instruct (bf16)", "date": dt.datetime.now().isoformat(timespec="seconds"),
            "seconds": time.monotonic() - t0, "quick": args.quick,
            "chunk_prefill": args.prefill or default_setting("memory", "prefill") if not args.url
            else "the --url server's setting",
            "facts_per_chunk": args.facts_per_chunk, "k": args.k, "blend": args.blend or "the config's (amem.blend)",
            "fidelity": level or f"the server's default ({default_setting('blend', 'fidelity')})",
            "text_arm_backend": ("amem server, plain requests" if args.quick or args.url
                                 else "SGLang's built-in RadixCache (--radix-cache-backend '')"),
            "command": "python -m benchmarks.cost_curve " + " ".join(argv if argv is not None else sys.argv[1:])}
    mode = ((meta["chunk_prefill"] if not args.url else "url") + (f"-{args.blend}" if args.blend else "")
            + (f"-{level}" if level else ""))
    stem = args.out / (f"{dt.date.today().isoformat()}-{device}-cost-curve-{mode}-f{args.facts_per_chunk}"
                       f"{'-quick' if args.quick else ''}")
    plot(result, stem.with_suffix(".png"), f"{meta['model']} on {device}: {summary['chunks']} chunks, "
                                          f"{summary['turns']} turns, top-{args.k}")
    payload = {"meta": meta, "summary": summary, "rows": [dataclasses.asdict(r) for r in result["rows"]],
               "fp32_answers": result.get("fp32_answers")}
    stem.with_suffix(".json").write_text(json.dumps(payload, indent=2))
    latest = {"device": device, "model": meta["model"], "date": meta["date"], "quick": args.quick,
              "prefill_ratio_per_query": summary["prefill_ratio_per_query"],
              "prefill_ratio_session": summary["prefill_ratio_session"],
              "ttft_ratio_per_query": summary["ttft_ratio_per_query"],
              "ttft_ratio_session": summary["ttft_ratio_session"],
              "ttft_ratio_median": summary["ttft_ratio_median"],
              "break_even_queries": summary["break_even_queries"]["per_query_used_chunks"],
              "break_even_detail": summary["break_even_queries"],
              "answer_agreement": summary["answer_agreement"]["query_vs_text"],
              "answer_agreement_detail": summary["answer_agreement"],
              "numeric_floor_agreement": floor,
              "numeric_floor_source": floor_source,
              "accuracy": summary["accuracy"],
              "correctness_agreement": summary["correctness_agreement"],
              "recompute_fraction": summary["recompute_fraction"],
              "turns_with_arm1_chunks": summary["turns_with_arm1_chunks"],
              "fidelity": meta["fidelity"], "ttft_breakdown": summary["ttft_breakdown"],
              "plot": stem.with_suffix(".png").name, "command": meta["command"]}
    if latest_too:
        (args.out / ("latest-quick.json" if args.quick else "latest.json")).write_text(json.dumps(latest, indent=2))
    lines = [f"# Cost curve ({meta['model']}, {device})", "", f"Command: `{meta['command']}`  ",
             f"Date: {meta['date']}, {meta['seconds']:.0f} s; arm 1 served by {meta['text_arm_backend']}; "
             f"chunk KV prefilled at {meta['chunk_prefill']}; {args.facts_per_chunk} user facts per fact chunk", "",
             f"![cost curve]({stem.with_suffix('.png').name})", "", "| metric | value |", "|---|---|"]
    for key, value in latest.items():
        if key not in ("plot", "command", "device", "model", "date", "ttft_breakdown"):
            lines.append(f"| {key} | {json.dumps(value) if isinstance(value, dict) else value} |")
    lines += ["", "## Time to first token, by phase", "",
              "usage.amem.timings (amem_sgl/memory/timings.py), mean per turn; out_s: the client's TTFT "
              "minus ingress_s + total_s + output_s (the server's share).", "", *table(summary["ttft_breakdown"])]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _run_with_servers(args, env, servers) -> dict:
    port = free_port()
    servers.append(start_server(f"{sys.executable} -m amem_sgl.launch_server --config {amem_config(args, env)} "
                                f"--port {port}", port=port, log_path=args.out / "cost-curve-amem.log",
                                cwd=ROOT, env=env))
    text_url = servers[0].url
    if not args.quick:  # arm 1 on SGLang's own radix cache
        port = free_port()
        servers.append(start_server(f"{sys.executable} -m amem_sgl.launch_server --config configs/default.yaml "
                                    f"--port {port} --radix-cache-backend ''", port=port,
                                    log_path=args.out / "cost-curve-text.log", cwd=ROOT, env=env))
        text_url = servers[1].url
    results = {}
    for i, level in enumerate(args.fidelity):
        if i:  # arm 1 must not find the previous level's prompts cached: it would prefill ~nothing
            flush_cache(text_url)
        results[level] = run_arms(servers[0].url, text_url, args.chunks, args.turns, args.k, args.max_tokens,
                                  args.facts_per_chunk, level)
    if not args.quick:
        for server in servers:
            server.stop()
        first = next(iter(results.values()))  # arm 1 is the same at every level: one floor
        floor, fp32 = numeric_floor(first, args.out)
        for result in results.values():
            result["floor"], result["fp32_answers"] = floor, fp32
    return results


if __name__ == "__main__":
    sys.exit(main())
