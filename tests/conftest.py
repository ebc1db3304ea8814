import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from support import ServerProcess  # noqa: E402


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """One trackpipe server for the whole session; tests use unique ids to stay apart."""
    proc = ServerProcess(tmp_path_factory.mktemp("trackpipe") / "data").start()
    yield proc
    proc.stop()


@pytest.fixture
def fresh_server(tmp_path):
    """A server of the test's own, for tests that restart, kill or reconfigure it."""
    procs: list[ServerProcess] = []

    def make(**kwargs) -> ServerProcess:
        proc = ServerProcess(tmp_path / f"data{len(procs)}", **kwargs)
        procs.append(proc)
        return proc

    yield make
    for proc in procs:
        proc.stop()
