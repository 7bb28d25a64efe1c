"""``amem proxy --upstream URL [--host H --port P] [--memory URL | --store DIR] [--keys-file FILE]``
(also ``python -m amem_sgl.proxy``): serve the proxy with uvicorn.

``--keys-file`` (or ``$AMEM_PROXY_KEYS_FILE``) turns auth on: the keys file of ``amem keys add``;
callers send their amem key in ``X-Amem-Api-Key`` (see amem_sgl.proxy.guard). Without one the proxy
serves only on a loopback ``--host`` unless ``--allow-open``.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

from amem_sgl.proxy import pricing
from amem_sgl.server.auth import is_loopback

# The most chunks an amem server's /amem/v1/search returns (amem_sgl.memory.api.SearchRequest.k); a
# --memory proxy asks it for --block-k of them every turn.
MEMORY_SERVER_MAX_K = 100


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="amem proxy", description=__doc__)
    p.add_argument("--upstream", required=True, help="the OpenAI/Anthropic-compatible API to forward to")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8088)
    where = p.add_mutually_exclusive_group()
    where.add_argument("--memory", default=None, help="an amem server's URL: recall through its /amem/v1 API")
    where.add_argument("--store", default=None, help="a memory store folder (default ~/.cache/amem_sgl/proxy/memory)")
    p.add_argument("--state-dir", default="~/.cache/amem_sgl/proxy", help="where sessions are persisted")
    p.add_argument("-k", type=int, default=6, help="chunks recalled per turn")
    p.add_argument("--block-k", type=int, default=12, help="chunks in a (re)built memory block")
    p.add_argument("--drift", type=float, default=0.5,
                   help="rebuild the memory block when more than this share of a turn's top-k is not in it")
    p.add_argument("--focus", type=int, default=1,
                   help="the best N recalled chunks also go into the newest turn when the block has them")
    p.add_argument("--ttl", choices=("5m", "1h"), default="5m", help="Anthropic cache_control TTL")
    p.add_argument("--timeout", type=float, default=600.0, help="upstream timeout, seconds")
    p.add_argument("--prices", default=None, help="a JSON price table (see amem_sgl/proxy/pricing.py)")
    p.add_argument("--keys-file", default=os.environ.get("AMEM_PROXY_KEYS_FILE") or None,
                   help="amem API keys (amem keys add FILE NAMESPACE...): every namespace needs a key that covers "
                        "it, sent in X-Amem-Api-Key (default $AMEM_PROXY_KEYS_FILE; none: auth off)")
    p.add_argument("--memory-api-key", default=os.environ.get("AMEM_API_KEY") or None,
                   help="the amem key the proxy shows the --memory server (default $AMEM_API_KEY; none: each "
                        "caller's own amem key is passed on)")
    p.add_argument("--max-request-bytes", type=int, default=32 * 1024 * 1024,
                   help="a larger request body is refused with a 413 (default 32 MiB)")
    p.add_argument("--exit-with-parent", action="store_true",
                   help="stop when the process that started this one ends, however it ends (Linux: a parent-death "
                        "signal; for tests and supervisors, so no proxy outlives them)")
    p.add_argument("--allow-open", action="store_true",
                   help="serve on a non-loopback --host without --keys-file (anyone who reaches it reads every "
                        "namespace)")
    args = p.parse_args(argv)
    if args.k < 1 or args.block_k < args.k or not 0 <= args.drift <= 1:
        p.error("need 1 <= -k <= --block-k and 0 <= --drift <= 1")
    if args.memory and args.block_k > MEMORY_SERVER_MAX_K:
        p.error(f"--block-k {args.block_k} is more than an amem --memory server returns per search "
                f"({MEMORY_SERVER_MAX_K}): every turn would fail; use --block-k <= {MEMORY_SERVER_MAX_K}")
    if args.focus < 0:
        p.error(f"--focus must be 0 (off) or a positive number of chunks, got {args.focus}")
    if not 0 <= args.port <= 65535:
        p.error(f"--port must be 0-65535, got {args.port}")
    if not (math.isfinite(args.timeout) and args.timeout > 0):
        p.error(f"--timeout must be a positive number of seconds, got {args.timeout}")
    if args.max_request_bytes < 1:
        p.error("--max-request-bytes must be positive")
    if not args.memory:
        args.memory_api_key = None  # only a --memory server is shown a key
    if not args.keys_file and not args.allow_open and not is_loopback(args.host):
        p.error(f"refusing to serve on {args.host}, a non-loopback address, without API keys: anyone who can "
                "reach it could use every namespace's memory. Create keys (amem keys add FILE NAMESPACE...) and "
                "pass --keys-file FILE, or pass --allow-open to serve without them")
    return args


def exit_with_parent() -> None:
    """SIGTERM to this process when its parent ends (prctl PR_SET_PDEATHSIG); if the parent is already
    gone, stop now."""
    import ctypes
    import signal

    parent = os.getppid()
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1
    if os.getppid() != parent:  # it ended before the signal was armed
        sys.exit(0)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.exit_with_parent:
        exit_with_parent()
    import uvicorn

    from amem_sgl.proxy.server import ProxyConfig, create_app

    try:
        prices = pricing.load_prices(args.prices)
    except (OSError, ValueError) as err:
        print(f"amem proxy: {err}", file=sys.stderr)
        return 2
    config = ProxyConfig(upstream=args.upstream, memory_url=args.memory, store_dir=args.store,
                         state_dir=args.state_dir, k=args.k, block_k=args.block_k, drift=args.drift,
                         focus=args.focus, ttl=args.ttl, timeout_s=args.timeout, prices=prices,
                         keys_file=args.keys_file, memory_api_key=args.memory_api_key,
                         max_request_bytes=args.max_request_bytes)
    try:
        app = create_app(config)
    except ValueError as err:  # the keys file cannot be read or parsed
        print(f"amem proxy: {err}", file=sys.stderr)
        return 2
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
