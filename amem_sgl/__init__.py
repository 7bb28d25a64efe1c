"""amem_sgl: KV-native agent memory built into SGLang.

This package's top level stays import-light (no torch, no SGLang): SGLang's plugin loader and the
CLI import it in every process.
"""

__version__ = "0.1.0"
