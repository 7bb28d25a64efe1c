"""amem_sgl: KV-native agent memory built into SGLang.

This package's top level stays import-light (no torch, no SGLang): SGLang's plugin loader and the
CLI import it in every process.
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    """``from amem_sgl import Amem`` (the SDK) without importing it for every process."""
    if name in ("Amem", "AmemError"):
        from amem_sgl import sdk

        return getattr(sdk, name)
    raise AttributeError(f"module 'amem_sgl' has no attribute {name!r}")
