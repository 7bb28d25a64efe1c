"""The reliability suite's server: the README's serve command with auth on (a keys file), a 2 MiB
disk tier and a 16K-token pool, 8 namespaces with a secret each (benchmarks/reliability/run.py).
Started once for the suite; the crash test starts two more of its own."""

import pytest


@pytest.fixture(scope="session")
def harness(tmp_path_factory):
    from benchmarks.reliability.run import Harness
    from tests.server import readme_serve_command

    harness = Harness(tmp_path_factory.mktemp("reliability"), serve_command=readme_serve_command())
    yield harness
    harness.stop()
