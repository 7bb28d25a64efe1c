"""Memory texts, the disk tier and the proxy's session state stay private: folders amem creates are
0700 (and so are the missing parents it creates on the way), the chunk KV files and session files
it writes there 0600 -- whatever the umask. The launcher made the disk tier's root with a plain
``mkdir`` before DiskStore's ``private_dir`` (which then changed nothing: 0755, files 0644), and
the proxy's ``--state-dir`` held recalled memory text (``sessions/*.json``) at 0755/0644."""

from __future__ import annotations

import logging
import os
import stat
import tempfile

import pytest
import torch


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture(params=[0o022, 0o000], ids=["umask022", "umask000"])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def test_the_disk_tier_folder_and_its_chunk_files_are_private(tmp_path, umask):
    from amem_sgl.residency.disk_store import DiskStore
    from amem_sgl.residency.keys import StoreKey

    store = DiskStore(tmp_path / "x" / "res", budget_bytes=10 << 20)
    kv = {"k": torch.zeros(2, 4, 1, 8), "v": torch.ones(2, 4, 1, 8)}
    assert store.put(StoreKey("c1", "m"), "alice", kv)
    assert mode(tmp_path / "x") == 0o700 and mode(store.root) == 0o700
    files = list(store.root.glob("*.safetensors"))
    assert files and all(mode(f) == 0o600 for f in files), [(f.name, oct(mode(f))) for f in files]


def test_the_launcher_creates_the_residency_root_private(tmp_path, monkeypatch, umask):
    from amem_sgl import launch_server
    from amem_sgl.config import RESIDENCY_DIR_ENV, AmemConfig
    from amem_sgl.residency import supervisor

    seen = {}

    class FakeSupervisor:  # the root as the launcher hands it over, before any service starts
        def __init__(self, root, address, **kwargs):
            seen["root"], self.address = root, address

        def start(self):
            return self

    monkeypatch.setattr(supervisor, "Supervisor", FakeSupervisor)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # its run folder, here
    monkeypatch.setenv(RESIDENCY_DIR_ENV, str(tmp_path / "x" / "res"))
    monkeypatch.setenv(launch_server.RESIDENCY_ADDR_ENV, "")  # restored after the launcher sets them
    monkeypatch.setenv(launch_server.RESIDENCY_SHM_ENV, "")
    assert launch_server._start_residency(AmemConfig()) is not None
    assert str(seen["root"]) == str(tmp_path / "x" / "res")
    assert mode(tmp_path / "x" / "res") == 0o700 and mode(tmp_path / "x") == 0o700


def test_the_proxy_session_store_is_private(tmp_path, umask):
    from amem_sgl.proxy.sessions import Session, SessionStore

    store = SessionStore(tmp_path / "state")
    session = Session("s1", "alice", block_ids=["c1"], block_text="Alice's sister lives in Lisbon.")
    store.save(session)
    store.save(session)  # a second save replaces the file, still private
    assert mode(tmp_path / "state") == 0o700 and mode(store.root) == 0o700
    files = list(store.root.iterdir())
    assert [f.name for f in files] == ["s1.json"] and mode(files[0]) == 0o600
    assert SessionStore(tmp_path / "state").get("s1", "alice").block_text == session.block_text


def test_an_existing_folder_of_ours_keeps_its_mode_with_a_warning(tmp_path, caplog):
    """As for the memory folder: a folder the user made (a group-shared one) is used as it is -- not
    re-moded behind their back -- and one others may read is said in a warning; files written into
    it are 0600 all the same."""
    from amem_sgl.residency.disk_store import DiskStore
    from amem_sgl.residency.keys import StoreKey

    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o750)
    with caplog.at_level(logging.WARNING, logger="amem_sgl.residency.keys"):
        store = DiskStore(shared, budget_bytes=10 << 20)
    assert mode(shared) == 0o750
    assert any("chmod 700" in r.getMessage() and str(shared) in r.getMessage() for r in caplog.records)
    assert store.put(StoreKey("c1", "m"), "alice", {"k": torch.zeros(1, 2, 1, 4), "v": torch.zeros(1, 2, 1, 4)})
    assert all(mode(f) == 0o600 for f in shared.glob("*.safetensors"))
