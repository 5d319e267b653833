"""Fixtures shared by the whole test suite (keep this small and generic)."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real text corpora in ``../shared/data`` (never copied into the project); skips where absent."""
    path = (REPO_ROOT / ".." / "shared" / "data").resolve()
    if not path.is_dir():
        pytest.skip("../shared/data not found: the real text corpora are needed for this test")
    return path


@pytest.fixture
def procs(tmp_path: Path):
    """Launch real processes (own process group and TMPDIR each); all of them are killed after the test."""
    from tests.helpers.procs import ProcessPool

    pool = ProcessPool(tmp_path)
    yield pool
    pool.close()


@pytest.fixture(autouse=True, scope="module")
def _ctrl_c_reaches_children():
    """Processes a test starts must stop on Ctrl-C, even after a test left SIGINT ignored in the pytest process
    (hivemind's averager does that to its caller; see tests.helpers.swarm.default_sigint)."""
    from tests.helpers.swarm import default_sigint

    with default_sigint():
        yield


@pytest.fixture(autouse=True, scope="module")
def _sigterm_is_ctrl_c():
    """SIGTERM to pytest (a CI time limit, ``kill``) unwinds like Ctrl-C, so fixture teardown stops the processes a
    test started. Each runs in its own process group and would otherwise outlive pytest: an interrupted run once
    left whole swarms training for an hour, and their load made later tests time out."""
    import signal

    def _interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, _interrupt)
    yield
    signal.signal(signal.SIGTERM, previous)
