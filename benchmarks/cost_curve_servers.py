"""The cost curve's servers (benchmarks.cost_curve): the amem server's config, the cache flush
between fidelity levels, and the fp32 replay of arm 1 for the numeric floor."""

from __future__ import annotations

import sys
from pathlib import Path

from tqdm.auto import tqdm

from amem_sgl import local_server
from amem_sgl.local_server import free_port, start_server

ROOT = Path(__file__).resolve().parents[1]


def flush_cache(url: str) -> None:
    """Arm 1's server emptied between fidelity levels (a level's turns may take a while to drain)."""
    local_server.flush_cache(url, tries=30, wait_s=1.0)


def numeric_floor(result: dict, out: Path) -> tuple[float, list[str]]:
    """The numeric floor on this run's own prompts: arm 1's requests again on plain SGLang in fp32;
    the share of answers identical to arm 1's (bf16)."""
    port = free_port()
    command = (f"{sys.executable} -m amem_sgl.launch_server --config configs/default.yaml --port {port} "
               f"--radix-cache-backend '' --dtype float32")
    from benchmarks.cost_curve import chat

    text = [r.answer for r in result["rows"] if r.arm == "text"]
    with start_server(command, port=port, log_path=out / "cost-curve-fp32.log", cwd=ROOT) as server:
        fp32 = [chat(server.url, body)[2] for body in tqdm(result["text_bodies"], desc="fp32 floor", file=sys.stderr)]
    return sum(a == b for a, b in zip(text, fp32)) / max(len(text), 1), fp32


def amem_config(args, env: dict) -> Path:
    """configs/default.yaml with ``-k``, ``--prefill`` and ``--blend`` applied (written next to the run's
    work folders)."""
    import yaml

    config = yaml.safe_load((ROOT / "configs" / "default.yaml").read_text())
    # The server recalls -k chunks per memory turn, as arm 1 does (it recalled its configured 4 while
    # arm 1 sent -k: with -k 8, prompts of 1,616 vs 830 tokens).
    config.setdefault("amem", {}).setdefault("memory", {})["top_k"] = args.k
    if args.prefill:
        config.setdefault("amem", {}).setdefault("memory", {})["prefill"] = args.prefill
    if args.blend:
        config.setdefault("amem", {}).setdefault("blend", {})["policy"] = args.blend
    path = Path(env["AMEM_SGL_MEMORY_DIR"]).parent / "amem-config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def default_setting(section: str, key: str) -> str:
    """amem.<section>.<key> of configs/default.yaml (e.g. memory.prefill, blend.fidelity)."""
    from amem_sgl.config import load_config_file

    return getattr(getattr(load_config_file(ROOT / "configs" / "default.yaml").amem, section), key)
