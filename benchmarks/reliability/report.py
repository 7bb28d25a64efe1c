"""The reliability run's result files: JSON (everything), markdown (the figures) and a PNG (fuzz
outcomes per route, load latency per request kind)."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.reliability.fuzz import KNOWN_BUGS


def short(step: dict) -> str:
    keys = ("requests", "errors", "violations", "cases", "five_xx", "unexplained_failures", "acknowledged", "lost",
            "kv_served", "files", "within_budget", "step_s")
    return ", ".join(f"{k}={step[k]}" for k in keys if k in step)


def _idle(state: dict) -> str:
    return (f"used {state['num_used_tokens']} / running {state['num_running_reqs']} / waiting "
            f"{state['num_waiting_reqs']} / protected {state['protected_tokens']} / pending splices "
            f"{state['pending_splices']}")


def _cut(load: dict) -> str:
    if load.get("stopped_at_s") is None:
        return ""
    return f" (stopped after {load['stopped_at_s']:.0f} s by --load-seconds: {load['requests']} of {load['planned']} sent)"


def markdown(meta: dict, r: dict) -> str:
    load, fz, crash, rk, disk = r["load"], r["fuzz"], r["crash"], r["residency_kill"], r["disk_full"]
    lines = [f"# Reliability: load, fuzz, faults ({meta['model']}, {meta['device']})", "",
             f"Command: `{meta['command']}`  ", f"Date: {meta['date']}; {meta['seconds']} s in all; "
             f"the load server started in {r['load_server_start_s']} s (auth on, 2 MiB disk tier, 16K-token pool)", "",
             "## Load", "",
             "| clients × requests | requests | errors | cross-namespace hits | SGLang leak lines | slots after (idle) "
             "| memory intact | own secret in the answer | req/s | wall s |", "|---|---|---|---|---|---|---|---|---|---|",
             f"| {load['clients']} × {load['per_client']} over {load['namespaces']} namespaces"
             f"{_cut(load)} | {load['requests']} | "
             f"{load['errors']} | {load['cross_namespace']} (violations {load['violations']}) | {len(load['leak_lines'])} | "
             f"{_idle(load['idle'])} | {load['memory']['intact']}/{load['memory']['namespaces']} | "
             f"{load['memory']['secret_answered']}/{load['memory']['namespaces']} | {load['requests_per_s']} | "
             f"{load['wall_s']} |", "", "| request kind | requests | errors | p50 s | max s |", "|---|---|---|---|---|"]
    lines += [f"| {k} | {v['requests']} | {v['errors']} | {v['p50_s']} | {v['max_s']} |" for k, v in load["kinds"].items()]
    turns = load.get("memory_turns") or {}
    if turns:
        lines += ["", "Memory turns by fidelity level (X-Amem-Fidelity): " + ", ".join(
            f"{level} {turns.get(level, 0)}" for level in ("fast", "guarded", "exact"))
            + f"; turns that spliced chunk KV {turns.get('turns_spliced', 0)}, escalated by the guard "
              f"{turns.get('turns_escalated', 0)} (non-streaming turns report usage)."]
    lines += ["", "## Fuzz", "",
              f"{fz['cases']} generated bad requests (seeded), {fz['wall_s']} s: **{fz['four_xx_with_message']}** a 4xx "
              f"with a message, {fz['five_xx']} 5xx, {fz['two_xx']} 2xx, {fz['no_answer']} unanswered; not explained by a "
              f"known bug: **{fz['unexplained_failures']}**; known bugs: {fz['known_bugs'] or 'none'}. Afterwards: memory "
              f"unchanged {fz['memory_unchanged']} ({fz['namespaces']} namespaces, {fz['chunks']} chunks), the same answer "
              f"{fz['same_answer_after']}, SGLang leak lines {len(fz['leak_lines'])}, slots {_idle(fz['idle'])}.", "",
              "| route | cases | status: count |", "|---|---|---|"]
    lines += [f"| `{route}` | {sum(c.values())} | {', '.join(f'{s}: {n}' for s, n in sorted(c.items()))} |"
              for route, c in fz["per_route"].items()]
    lines += ["", "| category | cases | status: count |", "|---|---|---|"]
    lines += [f"| {cat} | {sum(c.values())} | {', '.join(f'{s}: {n}' for s, n in sorted(c.items()))} |"
              for cat, c in fz["per_category"].items()]
    lines += ["", "## Faults", "", "| fault | figures |", "|---|---|",
              f"| kill -9 of the server during a {crash['chunks']}-chunk remember, then a restart | acknowledged "
              f"{crash['acknowledged']} (killed after {crash['killed_after_s']} s); lost **{crash['lost']}**, text changed "
              f"{crash['text_changed']}, half-written {crash['half_written']}, index misses {crash['index_misses']}/"
              f"{crash['index_checked']}, KV served {crash['kv_served']}/{crash['acknowledged']}, acknowledged without a "
              f"disk file {crash['acked_without_file']}, bad files {len(crash['bad_files'])}, quarantined "
              f"{crash['quarantined']}; start {crash['first_start_s']} s, restart {crash['restart_s']} s |",
              f"| kill -9 of the residency service under load (device tree flushed first) | {rk['load']['requests']} "
              f"requests, **{rk['load']['errors']} errors**, {rk['load']['violations']} violations; service restarted "
              f"{'yes' if rk['restarted_pid'] else 'NO'} (seen {rk['restart_seen_s']} s after the kill); server answering "
              f"{rk['server_alive']} |",
              f"| disk tier full ({disk['budget_bytes']} bytes) during remember of {disk['chunks']} chunks | acknowledged "
              f"{disk['acknowledged']}, errors {len(disk['errors'])}; {disk['files']} files, {disk['disk_bytes']} bytes "
              f"(within budget {disk['within_budget']}), acknowledged chunks with a file {disk['acked_with_file']}; bad "
              f"files {len(disk['bad_files'])}, quarantined {disk['quarantined']}, lost {disk['lost']}, KV served "
              f"{disk['kv_served']}/{disk['acknowledged']} |", "",
              f"Final state of the load server: slots {_idle(r['final']['idle'])}, SGLang leak lines "
              f"{len(r['final']['leak_lines'])}, answering {r['final']['answers']}.", "", "## Known bugs (strict xfails "
              "in tests/reliability/test_fuzz.py)", ""]
    lines += [f"* {name}" for name in KNOWN_BUGS]
    return "\n".join(lines) + "\n"


def plot(path: Path, r: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fz, kinds = r["fuzz"]["per_route"], r["load"]["kinds"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(15, 5.5), gridspec_kw={"width_ratios": [3, 2]})
    statuses = sorted({s for c in fz.values() for s in c})
    bottom = [0] * len(fz)
    for status in statuses:
        counts = [fz[route].get(status, 0) for route in fz]
        colour = "tab:red" if status.startswith("5") or status in ("0", "200") else None
        a.barh(list(fz), counts, left=bottom, label=status, color=colour)
        bottom = [x + y for x, y in zip(bottom, counts)]
    a.set_xlabel("generated bad requests"), a.set_title(f"fuzz: status per route ({r['fuzz']['cases']} cases)")
    a.legend(title="status", fontsize=8), a.invert_yaxis(), a.tick_params(axis="y", labelsize=8)
    names = list(kinds)
    b.bar(names, [kinds[k]["p50_s"] for k in names], label="p50")
    b.scatter(names, [kinds[k]["max_s"] for k in names], color="black", marker="_", s=200, label="max")
    b.set_ylabel("seconds"), b.tick_params(axis="x", rotation=60, labelsize=8)
    load = r["load"]
    b.set_title(f"load: {load['requests']} requests, {load['errors']} errors, {load['cross_namespace']} cross-namespace")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write(stem: Path, meta: dict, results: dict) -> None:
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, **results}, indent=1, default=sorted))
    stem.with_suffix(".md").write_text(markdown(meta, results).replace("\n## Faults", f"\n![reliability]({stem.name}.png)\n\n## Faults", 1))
    plot(stem.with_suffix(".png"), results)
