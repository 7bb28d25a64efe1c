"""``amem``: the command line.

    amem serve [--config configs/default.yaml] [sglang flags...]   # = python -m amem_sgl.launch_server
    amem remember NAMESPACE TEXT... [--file F] [--prefill first_use]  # against a running server
    amem ask NAMESPACE QUESTION
    amem search NAMESPACE QUERY [-k 4]
    amem forget NAMESPACE [CHUNK_ID]
    amem bench [fidelity|ttft|residency|kernels|...] [args...]      # python -m benchmarks.<name>
    amem mcp                                                        # MCP stdio server
    amem keys add FILE NAMESPACE... [--admin]                       # an API key (printed once)
    amem keys list FILE | amem keys remove FILE NAME                 # names and namespaces; revoke one
    amem proxy --upstream URL [--memory URL | --store DIR] [...]    # the closed-API drop-in (docs/proxy.md)
    amem version

The server URL comes from ``--url`` or ``$AMEM_URL`` (default http://127.0.0.1:30000), the API key
(servers with ``amem.auth.keys_file``) from ``--api-key`` or ``$AMEM_API_KEY``.
"""

from __future__ import annotations

import argparse
import json
import os
import runpy
import sys

# `amem bench NAME` runs python -m benchmarks.NAME; NAME as the README spells it (cost_curve) or
# with dashes (cost-curve).
_BENCH_MODULES = ("fidelity", "ttft", "residency", "numeric_floor", "cost_curve", "fidelity_tradeoff", "exact_bound",
                  "guard_signals", "proxy_cost", "reliability", "cpu_micro", "packed_linear",
                  "kernels.bench_rope_rerotate", "kernels.bench_blend_attention")
BENCHES = {name: f"benchmarks.{name}" for name in _BENCH_MODULES}
BENCHES.update({name.replace("_", "-"): module for name, module in list(BENCHES.items()) if "_" in name})
BENCHES.update({"kernels": "benchmarks.kernels.bench_rope_rerotate",
                "blend-attention": "benchmarks.kernels.bench_blend_attention"})


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["serve"]:
        from amem_sgl.launch_server import main as serve

        serve(argv[1:])
        return 0
    if argv[:1] == ["proxy"]:
        from amem_sgl.proxy.__main__ import main as proxy

        return proxy(argv[1:])
    if argv[:1] == ["bench"]:
        name = argv[1] if len(argv) > 1 and not argv[1].startswith("-") else "cost-curve"
        rest = argv[2:] if len(argv) > 1 and not argv[1].startswith("-") else argv[1:]
        if name not in BENCHES:
            print(f"amem bench: unknown benchmark {name!r}; one of {', '.join(BENCHES)}", file=sys.stderr)
            return 2
        sys.argv = [BENCHES[name], *rest]
        try:
            runpy.run_module(BENCHES[name], run_name="__main__")
        except SystemExit as done:
            return int(done.code or 0)
        return 0

    parser = argparse.ArgumentParser(prog="amem", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default=os.environ.get("AMEM_URL", "http://127.0.0.1:30000"),
                        help="the amem server (default: $AMEM_URL or http://127.0.0.1:30000)")
    parser.add_argument("--api-key", default=os.environ.get("AMEM_API_KEY") or None,
                        help="API key sent as a bearer token (default: $AMEM_API_KEY)")
    # The same two options after a client subcommand (`amem mcp --url U`, `amem ask ns q --url U`):
    # SUPPRESS keeps the top-level value unless given there.
    client = argparse.ArgumentParser(add_help=False)
    client.add_argument("--url", default=argparse.SUPPRESS, help="the amem server (as before the subcommand)")
    client.add_argument("--api-key", default=argparse.SUPPRESS, help="API key (as before the subcommand)")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", help="start the server (all sglang.launch_server flags)")
    sub.add_parser("bench", help="run a benchmark")
    sub.add_parser("proxy", help="the OpenAI/Anthropic proxy with recalled memory (amem proxy --help)")
    p = sub.add_parser("remember", help="remember texts", parents=[client])
    p.add_argument("namespace")
    p.add_argument("texts", nargs="*")
    p.add_argument("--file", action="append", default=[], help="a text file to remember (repeatable)")
    p.add_argument("--prefill", choices=("remember", "first_use"), default=None,
                   help="compute the chunks' KV now or in the first turn that recalls them (default: the server's)")
    p = sub.add_parser("ask", help="ask with a namespace's memory", parents=[client])
    p.add_argument("namespace")
    p.add_argument("question")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--fidelity", choices=("exact", "guarded", "fast"), default=None,
                   help="how far the turn may depart from a full prefill (default: the server's amem.blend.fidelity)")
    p = sub.add_parser("search", help="recall only", parents=[client])
    p.add_argument("namespace")
    p.add_argument("query")
    p.add_argument("-k", type=int, default=4)
    p = sub.add_parser("forget", help="forget a chunk or a namespace", parents=[client])
    p.add_argument("namespace")
    p.add_argument("chunk_id", nargs="?")
    sub.add_parser("mcp", help="MCP stdio server for a running amem server", parents=[client])
    p = sub.add_parser("keys", help="API keys scoped to namespaces (the server's amem.auth.keys_file)")
    keys_sub = p.add_subparsers(dest="keys_command", required=True)
    p = keys_sub.add_parser("add", help="create a key; prints it once, stores only its hash in FILE")
    p.add_argument("file", help="the keys file (created if missing; written atomically, mode 0600)")
    p.add_argument("namespaces", nargs="*", help="namespaces or glob patterns (team-*) the key covers")
    p.add_argument("--admin", action="store_true", help="cover every namespace")
    p = keys_sub.add_parser("list", help="the keys in FILE: names and what they cover (never the keys)")
    p.add_argument("file")
    p = keys_sub.add_parser("remove", help="revoke a key by name (a running server stops accepting it)")
    p.add_argument("file")
    p.add_argument("name")
    sub.add_parser("version", help="print versions")
    args = parser.parse_args(argv)

    if args.command == "version":
        import importlib.metadata as md

        import amem_sgl

        versions = {"amem_sgl": amem_sgl.__version__}
        for dist in ("sglang", "torch", "triton", "transformers"):
            try:
                versions[dist] = md.version(dist)
            except md.PackageNotFoundError:
                versions[dist] = None
        print(json.dumps(versions))
        return 0
    if args.command == "mcp":
        from amem_sgl.mcp_server import main as mcp_main

        return mcp_main(args.url, api_key=args.api_key)
    if args.command == "keys":
        return _keys(args)

    from amem_sgl.sdk import Amem, AmemError

    try:
        client = Amem(args.url, api_key=args.api_key)
        if args.command == "remember":
            texts = list(args.texts) + [_read_text(f) for f in args.file]
            if not texts:
                parser.error("remember: give texts or --file")
            done = client.remember(args.namespace, texts, prefill=args.prefill)
            print(json.dumps({"namespace": done.namespace, "ids": done.ids, "new": done.new}))
        elif args.command == "ask":
            answer = client.ask(args.namespace, args.question, max_tokens=args.max_tokens, fidelity=args.fidelity)
            print(answer.text)
            print(json.dumps({"chunks": answer.chunk_ids, "usage": answer.usage}), file=sys.stderr)
        elif args.command == "search":
            for c in client.search(args.namespace, args.query, args.k):
                print(json.dumps({"id": c.id, "score": c.score, "text": c.text}))
        elif args.command == "forget":
            # `amem forget NS` forgets the namespace; `amem forget NS ""` is a bad chunk id, not that.
            print(json.dumps({"forgotten": client.forget(args.namespace, args.chunk_id)}))
    except AmemError as err:
        if err.status == 0:  # cannot reach --url: a usage mistake as much as a bad value
            return _usage_error(args.command, str(err))
        print(f"amem {args.command}: {err}", file=sys.stderr)
        return 1
    except (ValueError, TypeError, OSError) as err:  # a bad argument or --file, caught before anything is sent
        return _usage_error(args.command, str(err))
    return 0


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as err:
        raise ValueError(f"--file {path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except OSError as err:
        raise ValueError(f"--file {path}: {err.strerror or err}") from None


def _usage_error(command: str, message: str) -> int:
    """One line on stderr and exit status 2, as argparse reports a bad argument (no traceback)."""
    print(f"amem {command}: error: {' '.join(message.split())}", file=sys.stderr)
    return 2


def _keys(args) -> int:
    from amem_sgl.server import auth

    try:
        if args.keys_command == "add":
            key, name = auth.add_key(args.file, args.namespaces, admin=args.admin)
            covers = "every namespace (admin)" if args.admin else ", ".join(args.namespaces)
            print(key)
            print(f"key {name} for {covers} stored (as its hash) in {args.file}; this is the only time the key "
                  "is shown", file=sys.stderr)
        elif args.keys_command == "list":
            for p in auth.list_keys(args.file):
                print(json.dumps({"name": p.name, "admin": p.admin, "namespaces": list(p.namespaces)}))
        elif not auth.remove_key(args.file, args.name):
            print(f"amem keys remove: no key named {args.name!r} in {args.file}", file=sys.stderr)
            return 1
    except (OSError, ValueError) as err:
        print(f"amem keys {args.keys_command}: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
