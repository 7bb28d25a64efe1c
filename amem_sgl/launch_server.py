"""``python -m amem_sgl.launch_server``: SGLang's own server with amem's radix cache plugged in.

Takes every ``sglang.launch_server`` flag (SGLang's parser reads them; nothing is re-declared here)
plus ``--config configs/<name>.yaml`` (sections ``sglang`` and ``amem``, see amem_sgl.config).
Defaults added beneath whatever the command line and config file say:

* ``--radix-cache-backend amem`` (ChunkRadixCache, registered through the ``sglang.srt.plugins``
  entry point) and ``--enable-cache-report`` (usage reports ``cached_tokens``);
* with no CUDA device: the CPU engine (``--device cpu``, ``--attention-backend torch_native``,
  ``SGLANG_USE_CPU_ENGINE=1``) with :data:`CPU_DEFAULTS` (idle sleep, a bounded KV pool, metrics);
  with CUDA, SGLang's normal GPU path;
* no ``--model-path``: the embedded SmolLM2-135M-Instruct, converted once (amem_sgl.models);
* ``amem.residency.enabled``: the residency service (amem_sgl.residency) started first as its own
  process, supervised (restarted if it dies) and stopped with the server; its address reaches the
  scheduler through ``AMEM_SGL_RESIDENCY_ADDR``.
* ``amem.auth``: with ``keys_file``, API keys scoped to namespaces (amem_sgl.server.auth); without
  it, a non-loopback ``--host`` is refused unless ``allow_open``. The per-server secret (chunk ids,
  namespace salts) is created beside the memory dir and reaches the scheduler in
  ``AMEM_SGL_SECRET_FILE``.

Precedence is command line > config file > these defaults (SGLang's own ``--config`` merge).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
from typing import Any, Callable

import yaml

from amem_sgl.config import CONFIG_ENV, AmemConfig, ModelConfig, load_config_file

BACKEND_FLAG = "radix-cache-backend"
RESIDENCY_ADDR_ENV = "AMEM_SGL_RESIDENCY_ADDR"
RESIDENCY_SHM_ENV = "AMEM_SGL_RESIDENCY_SHM"

# SGLang settings amem's launcher uses on the CPU engine unless the command line or the config file
# says otherwise (the same values as configs/default.yaml). Left to SGLang, an idle scheduler spins a
# core (on 2 cores that halves everything else on the machine) and the KV pool is sized from free RAM
# (~700K tokens, a 16 GB scheduler, 25 s to allocate); 128K tokens of SmolLM2 KV is 2.9 GB at bf16.
# Left to SGLang, dtype "auto" turns the embedded model's float32 config.json into float16.
CPU_DEFAULTS = {
    "dtype": "bfloat16",
    "sleep-on-idle": True,
    "max-total-tokens": 131072,
    "max-running-requests": 16,
    "enable-metrics": True,
}


@dataclasses.dataclass(frozen=True)
class LaunchPlan:
    """What to hand SGLang: the flags given on the command line, the merged config section that
    goes to SGLang's ``--config`` (defaults beneath the file's values), the amem settings, and the
    environment the server's processes need."""

    cli_args: list[str]
    sglang_config: dict[str, Any]
    amem: AmemConfig
    env: dict[str, str]
    backend: str = "amem"  # the radix-cache backend in effect ("" = SGLang's built-in RadixCache)

    def sglang_argv(self, config_path: str | None) -> list[str]:
        return self.cli_args + (["--config", config_path] if config_path else [])


def _norm(flag: str) -> str:
    return flag.lstrip("-").replace("_", "-")


def _cli_value(args: list[str], names: tuple[str, ...]) -> tuple[bool, str | None]:
    """Whether any of ``names`` (flag spelling, no dashes) is in ``args``, and the value after it."""
    for i, arg in enumerate(args):
        if not arg.startswith("--"):
            continue
        name, eq, value = arg.partition("=")
        if _norm(name) in names:
            if eq:
                return True, value
            nxt = args[i + 1] if i + 1 < len(args) else None
            return True, None if nxt is None or nxt.startswith("--") else nxt
    return False, None


def plan_launch(
    argv: list[str],
    *,
    cuda_available: bool,
    resolve_model: Callable[[ModelConfig], str],
) -> LaunchPlan:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--config", default=None)
    ours, rest = parser.parse_known_args(argv)
    file = load_config_file(ours.config) if ours.config else None
    # Keys in flag spelling (--max-total-tokens): SGLang's merger emits "--<key>" as written.
    section = {_norm(k): v for k, v in (file.sglang if file else {}).items()}
    amem = file.amem if file else AmemConfig()

    def lookup(*names: str) -> tuple[bool, Any]:
        present, value = _cli_value(rest, names)
        if present:
            return True, value
        for name in names:
            if name in section:
                return True, section[name]
        return False, None

    def default(name: str, value: Any) -> None:
        if not lookup(name)[0]:
            section[name] = value

    env = {CONFIG_ENV: amem.to_json()}
    default(BACKEND_FLAG, "amem")
    default("enable-cache-report", True)
    device = lookup("device")[1] or ("cuda" if cuda_available else "cpu")
    if str(device) == "cpu":
        default("device", "cpu")
        default("attention-backend", "torch_native")
        for name, value in CPU_DEFAULTS.items():
            default(name, value)
        # SGLang's overlap schedule processes a batch's results after launching the next batch; on
        # the CPU engine a launch is the whole forward, so every first token waited for a decode
        # step (memory turns on 2 cores: 0.17-2.2 s from the prefill's end to the first output,
        # 2-7 ms without it; amem usage.amem.timings output_s).
        default("disable-overlap-schedule", True)
        env["SGLANG_USE_CPU_ENGINE"] = "1"
    if not lookup("model-path", "model")[0]:
        section["model-path"] = str(resolve_model(amem.model))
    model_path = lookup("model-path", "model")[1]
    if model_path is not None and os.path.isdir(str(model_path)):
        env["HF_HUB_OFFLINE"] = "1"  # a local folder needs no hub; never wait on one
    backend = str(lookup(BACKEND_FLAG)[1] or "")
    _check_auth(amem, lookup("host")[1])
    return LaunchPlan(cli_args=rest, sglang_config=section, amem=amem, env=env, backend=backend)


def _check_auth(amem: AmemConfig, host) -> None:
    """Refuse a plan that would serve memory to anyone (non-loopback, no keys) or whose keys file
    cannot be read (ValueError with the reason)."""
    from amem_sgl.server.auth import KeyStore, exposure_error

    # SGLang's own default host is 127.0.0.1.
    problem = exposure_error("127.0.0.1" if host is None else str(host), amem.auth.keys_file, amem.auth.allow_open)
    if problem:
        raise ValueError(problem)
    if amem.auth.keys_file:
        KeyStore(amem.auth.keys_file)  # raises with the reason


def _request_guards(app, amem: AmemConfig, authenticator=None, sglang_api_key: str | None = None) -> None:
    from amem_sgl.memory.openai_routes import session_namespace
    from amem_sgl.server.limits import AuthGuard, ChunkHintsGuard, RequestBodyLimit, install_outermost

    # Starlette runs the last-added middleware first: the size limit sees the request before the
    # hints guard reads its body.
    app.add_middleware(ChunkHintsGuard, max_chunk_tokens=amem.chunks.max_chunk_tokens)
    app.add_middleware(RequestBodyLimit, max_bytes=amem.server.max_request_bytes)
    if authenticator is not None:  # first of all, before SGLang's --api-key check (added at start)
        install_outermost(app, AuthGuard, authenticator=authenticator, max_bytes=amem.server.max_request_bytes,
                          session_namespace=session_namespace, sglang_api_key=sglang_api_key)


def _authenticator(amem: AmemConfig, server_args):
    """This server's principals (amem keys, SGLang's keys, the memory layer's token), installed."""
    from amem_sgl.server import auth

    keys = auth.KeyStore(amem.auth.keys_file) if amem.auth.keys_file else None
    sglang_keys = tuple(k for k in (server_args.api_key, getattr(server_args, "admin_api_key", None)) if k)
    authenticator = auth.Authenticator(keys=keys, sglang_keys=sglang_keys)
    auth.install(authenticator)
    return authenticator


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    import torch

    from amem_sgl.models import ensure_embedded_model

    try:
        plan = plan_launch(
            argv,
            cuda_available=torch.cuda.is_available(),
            resolve_model=lambda model_config: ensure_embedded_model(config=model_config),
        )
    except ValueError as err:
        raise SystemExit(f"amem_sgl: {err}") from None
    for name, value in plan.env.items():
        if name == "HF_HUB_OFFLINE":
            os.environ.setdefault(name, value)  # the user's own setting wins
        else:
            os.environ[name] = value

    from amem_sgl import sglang_compat as sgl

    sgl.check_sglang_version()
    sgl.load_plugins()  # runs amem_sgl.plugin.load through the sglang.srt.plugins entry point
    backend = plan.backend
    if backend == "amem" and sgl.get_radix_cache_factory("amem") is None:
        raise SystemExit(
            "amem_sgl's SGLang plugin did not load (entry point 'sglang.srt.plugins: amem' missing); "
            "install the package with install/install.sh"
        )
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", prefix="amem-sglang-", delete=False) as fh:
        yaml.safe_dump(plan.sglang_config, fh)
        config_path = fh.name
    try:
        server_args = sgl.prepare_server_args(plan.sglang_argv(config_path))
    finally:
        os.unlink(config_path)
    from amem_sgl.server.auth import ensure_secret, publish_secret, secret_path

    # Before the scheduler and the memory layer compute a chunk id or a namespace salt.
    memory_dir = plan.amem.memory.resolved_dir()
    publish_secret(ensure_secret(secret_path(memory_dir), data_dir=memory_dir))
    authenticator = _authenticator(plan.amem, server_args)
    residency = _start_residency(plan.amem) if backend == "amem" else None
    if backend == "amem" and plan.amem.memory.enabled:
        _start_memory(plan.amem, server_args, authenticator.internal_headers())
    # added last: runs first, before any body is read (the auth guard before everything)
    _request_guards(sgl.http_app(), plan.amem, authenticator, server_args.api_key)
    from amem_sgl.server.validation import install_token_id_check

    install_token_id_check()  # token ids outside the vocabulary: 400, never a dead scheduler
    try:
        sgl.run_server(server_args)
    finally:
        if residency is not None:
            residency.stop()
        sgl.kill_process_tree(os.getpid(), include_parent=False)


def _start_memory(amem: AmemConfig, server_args, request_headers: dict | None = None) -> None:
    """The memory layer in this (HTTP) process: its routes on SGLang's app, the OpenAI hooks' data."""
    from amem_sgl import sglang_compat as sgl
    from amem_sgl.memory import layer
    from amem_sgl.memory.api import install_routes

    residency = None
    if os.environ.get(RESIDENCY_ADDR_ENV):
        from amem_sgl.residency.client import ResidencyClient

        residency = ResidencyClient(os.environ[RESIDENCY_ADDR_ENV], os.environ[RESIDENCY_SHM_ENV],
                                    timeout_s=amem.residency.timeout_s)
    host = "127.0.0.1" if server_args.host in ("0.0.0.0", "::", "") else server_args.host
    memory = layer.MemoryLayer(
        amem, base_url=f"http://{host}:{server_args.port}",
        model_id=str(server_args.served_model_name or server_args.model_path),
        tokenizer_path=str(server_args.tokenizer_path or server_args.model_path), residency=residency)
    memory.request_headers = dict(request_headers or {})
    layer.install(memory)
    install_routes(sgl.http_app())


def _start_residency(amem: AmemConfig):
    """Start the supervised residency service; its address goes to the scheduler by environment."""
    config = amem.residency
    if not config.enabled:
        return None
    from amem_sgl.residency.keys import private_dir
    from amem_sgl.residency.service import default_shm_dir
    from amem_sgl.residency.supervisor import Supervisor

    root = private_dir(config.resolved_dir())  # the disk tier's chunk KV: 0700, ours (DiskStore checks it too)
    run_dir = tempfile.mkdtemp(prefix="amem-residency-")
    shm_dir = default_shm_dir() / os.path.basename(run_dir)
    supervisor = Supervisor(root=root, address=f"ipc://{run_dir}/residency.sock", cpu_bytes=config.cpu_bytes,
                            disk_bytes=config.disk_bytes, policy=config.policy, weights=config.weights(),
                            shm_dir=str(shm_dir)).start()
    os.environ[RESIDENCY_ADDR_ENV] = supervisor.address
    os.environ[RESIDENCY_SHM_ENV] = str(shm_dir)
    return supervisor


if __name__ == "__main__":
    main()
