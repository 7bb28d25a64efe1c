"""How the launcher layers amem's defaults under the config file and the command line."""

from __future__ import annotations

import json

import pytest

from amem_sgl.config import CONFIG_ENV, AmemConfig
from amem_sgl.launch_server import plan_launch

EMBEDDED = "/cache/SmolLM2"


def plan(argv, cuda=False, resolved=None):
    calls = []

    def resolve(model_config):
        calls.append(model_config)
        return EMBEDDED

    result = plan_launch(argv, cuda_available=cuda, resolve_model=resolve)
    if resolved is not None:
        resolved.extend(calls)
    return result


def write(tmp_path, text, name="c.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_cpu_defaults_without_cuda():
    p = plan(["--port", "1234"])
    assert p.cli_args == ["--port", "1234"]
    assert p.sglang_config == {"radix-cache-backend": "amem", "enable-cache-report": True,
                               "device": "cpu", "attention-backend": "torch_native", "dtype": "bfloat16",
                               "sleep-on-idle": True, "max-total-tokens": 131072,
                               "max-running-requests": 16, "enable-metrics": True,
                               "disable-overlap-schedule": True, "model-path": EMBEDDED}
    assert p.env["SGLANG_USE_CPU_ENGINE"] == "1"
    assert json.loads(p.env[CONFIG_ENV]) == json.loads(AmemConfig().to_json())


def test_cpu_defaults_without_config_are_the_default_configs_and_reach_sglangs_parser(tmp_path):
    """No --config: SGLang's own parser sees idle sleep and a bounded KV pool (the values of
    configs/default.yaml), and a flag on the command line still wins."""
    import yaml

    from amem_sgl import sglang_compat as sgl
    from amem_sgl.launch_server import CPU_DEFAULTS

    shipped = yaml.safe_load(open("configs/default.yaml"))["sglang"]
    for name, value in CPU_DEFAULTS.items():
        assert shipped[name.replace("-", "_")] == value, name

    def server_args(argv):
        p = plan(argv)
        path = tmp_path / "merged.yaml"
        path.write_text(yaml.safe_dump(p.sglang_config))
        return sgl.prepare_server_args(p.sglang_argv(str(path)))

    args = server_args([])
    assert args.sleep_on_idle is True and args.max_total_tokens == 131072 and args.enable_metrics is True
    assert args.disable_overlap_schedule is True  # on CPU a first token must not wait for a decode step
    assert args.dtype == "bfloat16"  # SGLang's "auto" would serve the embedded fp32 config as fp16
    args = server_args(["--max-total-tokens", "4096"])
    assert args.max_total_tokens == 4096 and args.sleep_on_idle is True


def test_cuda_leaves_sglangs_gpu_path_alone():
    p = plan([], cuda=True)
    assert "device" not in p.sglang_config and "attention-backend" not in p.sglang_config
    assert "SGLANG_USE_CPU_ENGINE" not in p.env
    assert p.sglang_config["radix-cache-backend"] == "amem"


def test_explicit_cpu_device_on_a_cuda_machine_gets_the_cpu_engine():
    p = plan(["--device", "cpu"], cuda=True)
    assert p.env["SGLANG_USE_CPU_ENGINE"] == "1"
    assert p.sglang_config["attention-backend"] == "torch_native"
    assert "device" not in p.sglang_config  # the command line says it already


def test_command_line_wins_over_defaults_and_model_is_not_converted():
    resolved = []
    p = plan(["--model-path=/my/model", "--attention-backend", "sdpa",
              "--radix-cache-backend", "other"], resolved=resolved)
    assert resolved == []
    for flag in ("model-path", "attention-backend", "radix-cache-backend"):
        assert flag not in p.sglang_config


def test_config_file_values_sit_between_defaults_and_command_line(tmp_path):
    path = write(tmp_path, "sglang:\n  max_total_tokens: 4096\n  attention_backend: sdpa\n"
                           "  model-path: /from/config\namem:\n  server: {max_request_bytes: 1000}\n")
    resolved = []
    p = plan(["--config", path, "--max-total-tokens", "8192"], resolved=resolved)
    assert resolved == []
    assert p.sglang_config["max-total-tokens"] == 4096  # SGLang's merge lets the CLI's 8192 win
    assert p.cli_args == ["--max-total-tokens", "8192"]
    assert p.sglang_config["attention-backend"] == "sdpa"
    assert p.sglang_config["model-path"] == "/from/config"
    assert p.amem.server.max_request_bytes == 1000
    assert p.sglang_argv("/tmp/x.yaml")[-2:] == ["--config", "/tmp/x.yaml"]


def test_model_config_reaches_the_resolver(tmp_path):
    path = write(tmp_path, "amem:\n  model: {embedded: smollm2, cache_dir: /elsewhere}\n")
    resolved = []
    plan(["--config", path], resolved=resolved)
    assert [m.cache_dir for m in resolved] == ["/elsewhere"]


@pytest.mark.parametrize("text, message", [
    ("amem:\n  nonsense: 1\n", "unknown key"),
    ("amem:\n  server: {max_request_bytes: big}\n", "must be int"),
    ("amem:\n  server: {max_request_bytes: true}\n", "must be int"),
    ("other: 1\n", "unknown top-level"),
    ("- a\n- b\n", "top level must be a mapping"),
    ("sglang: [1, 2]\n", "'sglang' must be a mapping"),
    ("amem:\n  blend: {policy: magic}\n", "amem.blend.*policy must be one of"),
    ("amem:\n  blend: {policy: sink, sink_tokens: 0}\n", "sink_tokens must be an integer"),
])
def test_bad_config_files_are_refused_with_a_message(tmp_path, text, message):
    with pytest.raises(ValueError, match=message):
        plan(["--config", write(tmp_path, text)])


def test_config_must_be_an_existing_yaml_file(tmp_path):
    with pytest.raises(ValueError, match="YAML"):
        plan(["--config", write(tmp_path, "x: 1", name="c.json")])
    with pytest.raises(FileNotFoundError):
        plan(["--config", str(tmp_path / "missing.yaml")])


def test_amem_config_round_trips_through_the_environment(monkeypatch):
    config = AmemConfig.from_dict({"server": {"max_request_bytes": 123}, "model": {"embedded": "smollm2"}})
    monkeypatch.setenv(CONFIG_ENV, config.to_json())
    assert AmemConfig.from_env() == config
    monkeypatch.delenv(CONFIG_ENV)
    assert AmemConfig.from_env() == AmemConfig()


def test_shipped_configs_parse():
    from pathlib import Path

    from amem_sgl.config import load_config_file

    for path in sorted(Path(__file__).resolve().parents[1].glob("configs/*.yaml")):
        config = load_config_file(path)
        assert config.amem.model.embedded == "smollm2", path


@pytest.mark.parametrize("argv, backend", [([], "amem"), (["--radix-cache-backend", "amem"], "amem"),
                                            (["--radix-cache-backend", ""], ""),
                                            (["--radix-cache-backend=other"], "other")])
def test_the_backend_in_effect_decides_whether_residency_and_memory_start(argv, backend):
    plan = plan_launch(argv, cuda_available=False, resolve_model=lambda m: "/models/x")
    assert plan.backend == backend


def test_shipped_configs_plan_as_they_are(tmp_path):
    """Both shipped configs start as their comments say (the GPU one on a CUDA machine)."""
    for name, cuda in (("configs/default.yaml", False), ("configs/gpu.yaml", True)):
        p = plan(["--config", name], cuda=cuda)
        assert p.sglang_config["radix-cache-backend"] == "amem", name
        assert p.sglang_config["dtype"] == "bfloat16", name
