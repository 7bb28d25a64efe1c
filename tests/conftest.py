"""Test session set-up: no model hub, ever (everything loads from packages or local folders),
and one real amem server shared by every integration test of the session."""

import os

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
# SGLang layers built in-process (rotary embeddings, pools) take their CPU code paths.
os.environ["SGLANG_USE_CPU_ENGINE"] = "1"
# Without a GPU, Triton kernels run only in its interpreter, and kernels that use Triton's standard
# library (tl.max, tl.sum) need the switch set before triton is first imported. Servers started by
# the tests do not inherit it (amem_sgl.local_server drops it).
if not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def amem_server(tmp_path_factory):
    """The README's serve command, started once; stopped when the session ends."""
    from tests.server import start_readme_server

    server = start_readme_server(tmp_path_factory.mktemp("amem-server"))
    yield server
    server.stop()
