"""``amem proxy --upstream URL [--host H --port P] [--memory URL | --store DIR]`` (also
``python -m amem_sgl.proxy``): serve the proxy with uvicorn."""

from __future__ import annotations

import argparse
import sys

from amem_sgl.proxy import pricing


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
    args = p.parse_args(argv)
    if args.k < 1 or args.block_k < args.k or not 0 <= args.drift <= 1:
        p.error("need 1 <= -k <= --block-k and 0 <= --drift <= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    import uvicorn

    from amem_sgl.proxy.server import ProxyConfig, create_app

    try:
        prices = pricing.load_prices(args.prices)
    except (OSError, ValueError) as err:
        print(f"amem proxy: {err}", file=sys.stderr)
        return 2
    config = ProxyConfig(upstream=args.upstream, memory_url=args.memory, store_dir=args.store,
                         state_dir=args.state_dir, k=args.k, block_k=args.block_k, drift=args.drift,
                         focus=args.focus, ttl=args.ttl, timeout_s=args.timeout, prices=prices)
    uvicorn.run(create_app(config), host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
