"""The proxy's cost benchmark: one 30-turn session over >= 200 memory chunks with drifting recall,
three arms side by side against the same real upstream (a plain SGLang server, its radix cache reporting the
cached tokens), all through Anthropic's ``/v1/messages``:

1. ``full``  -- the namespace's whole memory re-sent in the system prompt every turn;
2. ``mem0``  -- Mem0-style: the turn's top-k recalled facts injected into the last user message (the
                client's history keeps its own messages, so last turn's injection is gone);
3. ``proxy`` -- the anthropic SDK pointed at ``amem proxy`` (same store, same k).

The session asks about one person for a few turns, then moves on (recall drifts). Billed input cost
per turn under the Anthropic and OpenAI price tables (amem_sgl.proxy.pricing), from the upstream's
own counts: Anthropic reads the cache only up to ``cache_control`` breakpoints, so arms 1-2 as sent
(none) pay the base price on every token, and the proxy's reads are the upstream's
``cache_read_input_tokens`` with every uncached token billed as a cache write (an upper bound: the
real server reports no writes); OpenAI caches every prompt prefix, so all arms get the upstream's
cached tokens at the cached price. Both tables apply the providers' 1024-token minimum. Also
reported: arms 1-2 billed as if the client had set its own breakpoint (``*_client_bp``), the cache
hit rate per turn and each arm's accuracy (the answer names the asked fact's value).

    python -m benchmarks.proxy_cost           # 30 turns, 200 chunks, starts its own upstream (~25 min, 2 cores)
    python -m benchmarks.proxy_cost --quick   # 4 turns, 40 chunks (smoke)
Writes ``benchmarks/results/<date>-<device>-proxy-cost[-quick].{json,md,png}``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime as dt
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import requests

from amem_sgl.local_server import free_port, start_server
from amem_sgl.proxy import pricing
from benchmarks.fidelity import device_name
from benchmarks.fidelity_data import CITIES, FILLER, FIRST, LAST

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
# Values shared between people (six colours, six employers...): the committed run's memory.
ATTRIBUTES = {"home city": CITIES, "favorite color": ["teal", "crimson", "amber", "violet", "olive", "indigo"],
              "employer": ["Boeing", "Siemens", "Nokia", "Pfizer", "Lufthansa", "Toyota"],
              "pet's name": ["Biscuit", "Mochi", "Pepper", "Ziggy", "Luna", "Waffles"],
              "favorite food": ["ramen", "paella", "pierogi", "tacos", "falafel", "risotto"],
              "car": ["Volvo", "Fiat", "Subaru", "Tesla", "Mazda", "Skoda"],
              "hobby": ["chess", "pottery", "surfing", "archery", "knitting", "rowing"],
              "birth month": ["March", "July", "October", "January", "May", "September"]}
# Values never shared between two people (``unique=True``): SmolLM2-135M then copies the value next to
# the asked name instead of the one most frequent in its context.
UNIQUE_ATTRIBUTES = {
    "home city": CITIES,
    "employer": ["Boeing", "Siemens", "Nokia", "Pfizer", "Lufthansa", "Toyota", "Philips", "Ericsson", "Heineken",
                 "Unilever", "Airbus", "Bosch", "Danone", "Nestle", "Volvo", "Lego", "Ikea", "Spotify", "Adidas",
                 "Canon", "Nikon", "Sony", "Samsung", "Hyundai", "Infosys", "Wipro", "Embraer", "Petrobras", "Maersk",
                 "Novartis"],
    "pet's name": ["Biscuit", "Mochi", "Pepper", "Ziggy", "Luna", "Waffles", "Nugget", "Pickles", "Maple", "Bramble",
                   "Pixel", "Clover", "Juniper", "Toffee", "Sprocket", "Widget", "Marzipan", "Quincy", "Rascal",
                   "Tofu", "Gizmo", "Noodle", "Peanut", "Saffron", "Tinsel", "Oberon", "Pumpkin", "Yoshi", "Zephyr",
                   "Fennel"],
    "locker code": [str(n) for n in range(4100, 9900, 191)],
    "room number": [str(n) for n in range(210, 990, 26)],
    "badge number": [str(n) for n in range(51000, 99000, 1601)],
    "parking spot": [f"{c}{n}" for c in "BDFH" for n in range(11, 19)],
    "phone extension": [str(n) for n in range(3100, 3999, 29)]}
ARMS = ("full", "mem0", "proxy")


def plain_upstream_command(port: int) -> str:
    """A plain SGLang 0.5.23 server (its own RadixCache, no amem) on the embedded model, CPU engine."""
    from amem_sgl.models import ensure_embedded_model

    return (f"SGLANG_USE_CPU_ENGINE=1 HF_HUB_OFFLINE=1 {sys.executable} -m sglang.launch_server "
            f"--model-path {ensure_embedded_model()} --device cpu --attention-backend torch_native "
            f"--max-total-tokens 16384 --sleep-on-idle --enable-cache-report --port {port}")


def make_memory(people: int, attributes: int = 4, unique: bool = False,
                seed: int = 0) -> tuple[list[str], dict[str, list[tuple[str, str]]]]:
    """One short fact per chunk, ``attributes`` per person; no two people share a first or last name
    (at most 30), nor, with ``unique``, a value. Returns (facts, person -> [(question, answer)])."""
    table = UNIQUE_ATTRIBUTES if unique else ATTRIBUTES
    if people > min(len(FIRST), len(LAST)) or attributes > len(table):
        raise ValueError(f"at most {min(len(FIRST), len(LAST))} people and {len(table)} attributes")
    rng = random.Random(seed)
    first, last = rng.sample(FIRST, people), rng.sample(LAST, people)
    drawn = {attr: rng.sample(range(len(pool)), people) for attr, pool in table.items()} if unique else None
    facts, asks = [], {}
    for name in (f"{f} {l}" for f, l in zip(first, last)):
        for attr, values in list(table.items())[:attributes]:
            value = values[drawn[attr].pop()] if unique else rng.choice(values)
            facts.append(f"The {attr} of {name} is {value}.")
            asks.setdefault(name, []).append((f"What is the {attr} of {name}?", value))
    return facts, asks


def session_questions(asks: dict, turns: int, per_person: int = 3, seed: int = 1) -> list[tuple[str, str]]:
    """``per_person`` questions about one person, then the next: recall drifts every few turns."""
    rng = random.Random(seed)
    people = rng.sample(sorted(asks), -(-turns // per_person))
    out = []
    for person in people:
        out += rng.sample(asks[person], min(per_person, len(asks[person])))
    return out[:turns]


def system_prompt(sentences: int, session: str = "") -> str:
    """An agent's instructions (the client's own system prompt, the same in every arm; ``session``
    names the conversation first, so concurrent arms share no cached prefix on the upstream)."""
    rules = [f"Guideline {i + 1}: {FILLER[i % len(FILLER)]}" for i in range(sentences)]
    return (f"{session}You are a helpful personal assistant. Answer in one short sentence, using the memory.\n"
            + "\n".join(rules))


def messages_call(url: str, body: dict, headers: dict | None = None) -> dict:
    reply = requests.post(f"{url}/v1/messages", json=body, headers=headers or {}, timeout=900)
    reply.raise_for_status()
    return reply.json()


def bill(usage: dict, arm: str, prices: dict, client_bp: bool = False) -> dict:
    """USD per model for one turn's input, as each provider would bill it (see the module doc)."""
    read = int(usage.get("cache_read_input_tokens") or 0)
    total = int(usage.get("input_tokens") or 0) + read + int(usage.get("cache_creation_input_tokens") or 0)
    out = {}
    for model in prices["anthropic"]["models"]:
        bp = arm == "proxy" or client_bp
        out[f"anthropic:{model}"] = pricing.input_cost(prices, "anthropic", model, total=total,
                                                       read=read if bp else 0, written=total - read if bp else 0)
    for model in prices["openai"]["models"]:
        out[f"openai:{model}"] = pricing.input_cost(prices, "openai", model, total=total, read=read)
    return out


def run_arm(arm: str, upstream: str, proxy: str, namespace: str, facts: list[str], questions, args) -> list[dict]:
    system = system_prompt(args.system_sentences, f"Session {ARMS.index(arm) + 1}. ")
    if arm == "full":
        system += "\n\nMemory about the user:\n" + "\n".join(f"- {f}" for f in facts)
    history, rows = [], []
    for t, (question, gold) in enumerate(questions):
        content = question
        if arm == "mem0":
            hits = requests.post(f"{proxy}/amem/v1/search", json={"namespace": namespace, "query": question,
                                                                  "k": args.k}, timeout=120).json()["results"]
            content = "Relevant memories:\n" + "\n".join(f"- {h['text']}" for h in hits) + f"\n\n{question}"
        body = {"model": "default", "max_tokens": args.max_tokens, "temperature": 0, "system": system,
                "messages": [*history, {"role": "user", "content": content}]}
        if arm == "proxy":
            body["metadata"] = {"user_id": namespace}
        t0 = time.monotonic()
        data = messages_call(proxy if arm == "proxy" else upstream, body)
        answer = "".join(b.get("text", "") for b in data["content"] if b.get("type") == "text")
        usage = data["usage"]
        history += [{"role": "user", "content": question}, {"role": "assistant", "content": answer or "(no answer)"}]
        read = int(usage.get("cache_read_input_tokens") or 0)
        total = int(usage.get("input_tokens") or 0) + read
        amem = usage.get("amem") or {}
        rows.append({"arm": arm, "turn": t + 1, "question": question, "gold": gold, "answer": answer,
                     "correct": gold.lower() in answer.lower(), "prompt_tokens": total, "cached_tokens": read,
                     "hit_rate": read / total if total else 0.0, "seconds": round(time.monotonic() - t0, 2),
                     "block_rebuilt": amem.get("block_rebuilt"), "chunks_used": amem.get("chunks_used"),
                     "proxy_reported_usd": (amem.get("cost") or {}).get("proxy_usd"),
                     "cost": bill(usage, arm, args.prices), "cost_client_bp": bill(usage, arm, args.prices, True)})
        print(f"[{arm}] turn {t + 1}: {total} prompt, {read} cached, correct={rows[-1]['correct']}", flush=True)
    return rows


def summarize(rows: list[dict]) -> dict:
    out = {}
    for arm in ARMS:
        mine = [r for r in rows if r["arm"] == arm]
        keys = mine[0]["cost"].keys()
        out[arm] = {"turns": len(mine), "accuracy": sum(r["correct"] for r in mine) / len(mine),
                    "prompt_tokens": sum(r["prompt_tokens"] for r in mine),
                    "cached_tokens": sum(r["cached_tokens"] for r in mine),
                    "hit_rate_after_turn_1": (sum(r["cached_tokens"] for r in mine[1:]) /
                                              max(1, sum(r["prompt_tokens"] for r in mine[1:]))),
                    "cost": {k: sum(r["cost"][k] for r in mine) for k in keys},
                    "cost_client_bp": {k: sum(r["cost_client_bp"][k] for r in mine) for k in keys}}
    ratios = {}
    for key in out["proxy"]["cost"]:
        ratios[key] = {f"{arm}_over_proxy": out[arm]["cost"][key] / out["proxy"]["cost"][key] for arm in ("full", "mem0")}
        ratios[key].update({f"{arm}_client_bp_over_proxy": out[arm]["cost_client_bp"][key] / out["proxy"]["cost"][key]
                            for arm in ("full", "mem0")})
    out["ratios"] = ratios
    return out


def plot(rows: list[dict], path: Path, title: str, keys: tuple[str, str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    for ax, key in zip(axes[:2], keys):
        for arm in ARMS:
            mine = [r for r in rows if r["arm"] == arm]
            total, ys = 0.0, []
            for r in mine:
                total += r["cost"][key]
                ys.append(total * 1000)
            ax.plot([r["turn"] for r in mine], ys, marker="o", ms=3, label=arm)
        ax.set(title=f"cumulative input cost, {key}", xlabel="turn", ylabel="USD x 1000")
        ax.legend()
    for arm in ARMS:
        mine = [r for r in rows if r["arm"] == arm]
        axes[2].plot([r["turn"] for r in mine], [r["hit_rate"] for r in mine], marker="o", ms=3, label=arm)
    axes[2].set(title="upstream cache hit rate per turn", xlabel="turn", ylabel="cached / prompt tokens", ylim=(0, 1.02))
    axes[2].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--upstream", default=None, help="a running plain SGLang server (default: start one)")
    p.add_argument("--people", type=int, default=None, help="default 25; quick 10")
    p.add_argument("--unique-values", action="store_true", help="no value shared between two people")
    p.add_argument("--attributes", type=int, default=None, help="facts (chunks) per person (default 8; quick 4)")
    p.add_argument("--turns", type=int, default=None, help="default 30; quick 4")
    p.add_argument("-k", type=int, default=6)
    p.add_argument("--max-tokens", type=int, default=None)
    p.add_argument("--system-sentences", type=int, default=None, help="client system prompt length (default 60; quick 8)")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    args.people = args.people or (10 if args.quick else 25)
    args.turns = args.turns or (4 if args.quick else 30)
    args.attributes = args.attributes or (4 if args.quick else 8)
    args.max_tokens = args.max_tokens or 16
    args.system_sentences = args.system_sentences or (8 if args.quick else 60)
    args.prices = pricing.PRICES
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="amem-proxy-cost-"))
    servers = []
    try:
        upstream = args.upstream
        if upstream is None:
            port = free_port()
            servers.append(start_server(plain_upstream_command(port), port=port, log_path=work / "upstream.log"))
            upstream = servers[-1].url
        port = free_port()
        servers.append(start_server(
            f"{sys.executable} -m amem_sgl.proxy --upstream {upstream} --port {port} --store {work}/memory "
            f"--state-dir {work}/state -k {args.k} --block-k {2 * args.k} --exit-with-parent", port=port,
            log_path=work / "proxy.log",
            timeout_s=180))
        proxy = servers[-1].url
        facts, asks = make_memory(args.people, args.attributes, args.unique_values)
        requests.post(f"{proxy}/amem/v1/remember", json={"namespace": "bench-user", "texts": facts},
                      timeout=600).raise_for_status()
        questions = session_questions(asks, args.turns)
        requests.post(f"{upstream}/flush_cache", timeout=60)
        with concurrent.futures.ThreadPoolExecutor(len(ARMS)) as pool:  # the arms run side by side
            runs = [pool.submit(run_arm, arm, upstream, proxy, "bench-user", facts, questions, args) for arm in ARMS]
            rows = [row for run in runs for row in run.result()]
    finally:
        for server in reversed(servers):
            server.stop()
    return report(rows, args, len(facts))


def report(rows: list[dict], args, chunks: int) -> int:
    device = device_name()
    summary = summarize(rows)
    stem = args.out / f"{dt.date.today().isoformat()}-{device}-proxy-cost{'-quick' if args.quick else ''}"
    meta = {"device": device, "model": "SmolLM2-135M-Instruct (plain SGLang 0.5.23 upstream)", "chunks": chunks,
            "turns": args.turns, "k": args.k, "date": dt.datetime.now().isoformat(timespec="seconds"),
            "command": "python -m benchmarks.proxy_cost" + (" --quick" if args.quick else ""), "prices": args.prices}
    a_key, o_key = f"anthropic:{args.prices['anthropic']['default']}", f"openai:{args.prices['openai']['default']}"
    title = f"amem proxy vs re-sent memory: {chunks} chunks, {args.turns} turns, {device}"
    plot(rows, stem.with_suffix(".png"), title, (a_key, o_key))
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "summary": summary, "rows": rows}, indent=1))
    lines = [f"# Proxy cost ({device})", "", f"Command: `{meta['command']}`  ", f"{chunks} chunks, {args.turns} turns, "
             f"k={args.k}; upstream: {meta['model']}", "", "| arm | accuracy | hit rate (turns 2+) | "
             f"{a_key} USD | {o_key} USD | {a_key} with a client breakpoint |", "|---|---|---|---|---|---|"]
    for arm in ARMS:
        s = summary[arm]
        lines.append(f"| {arm} | {s['accuracy']:.2f} | {s['hit_rate_after_turn_1']:.2f} | {s['cost'][a_key]:.5f} | "
                     f"{s['cost'][o_key]:.5f} | {s['cost_client_bp'][a_key]:.5f} |")
    lines += ["", "Cost ratios (arm / proxy):", ""]
    for key, r in summary["ratios"].items():
        lines.append(f"- {key}: full {r['full_over_proxy']:.2f}x, mem0 {r['mem0_over_proxy']:.2f}x "
                     f"(with a client breakpoint: full {r['full_client_bp_over_proxy']:.2f}x, "
                     f"mem0 {r['mem0_client_bp_over_proxy']:.2f}x)")
    lines += ["", f"![cumulative cost]({stem.with_suffix('.png').name})"]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(json.dumps({arm: {"accuracy": summary[arm]["accuracy"], "cost": summary[arm]["cost"][a_key]} for arm in ARMS}))
    print(f"wrote {stem}.json/.md/.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
