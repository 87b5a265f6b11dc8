"""Long serial runs started when the session starts, for tests that read their results much later.

Most of the suite keeps one of CI's two cores busy (about 1.45 cores on average); a Snakemake pipeline whose
stage processes run one after the other keeps one core busy too. Started when the session starts
(tests/conftest.py: ``early_runs_started``), it runs beside the tests that come first, and the test that reads it
finds it finished or nearly so, instead of running it then with a core idle. The run is the same command the test
would start itself; it is started only when a test that needs it is selected, and killed at the session's end if
that test never took it (a session stopped early by ``-x``). ``PGOLF_TEST_EARLY_RUNS=0`` turns it off.
"""

from __future__ import annotations

import os
import signal
import subprocess
from typing import Callable, Optional

# name -> (result of the starter: e.g. (work folder, process)); filled by conftest, emptied by the tests
_started: dict[str, tuple] = {}


def start(name: str, starter: Callable[[], tuple]) -> None:
    _started[name] = starter()


def take(name: str) -> Optional[tuple]:
    """The run started early under ``name``, once; None when none was (the test then starts its own)."""
    return _started.pop(name, None)


def kill_group(proc: subprocess.Popen) -> None:
    """Kill a run and, when it was started with ``start_new_session=True``, every process it started (Snakemake's
    jobs); a process that leads no group of its own is killed alone (its children then end on their own)."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:  # no group of that id: not started in a session of its own
            proc.kill()
        proc.wait()


def stop_all() -> None:
    """Kill the processes of the runs no test took (every process in each run's tuple)."""
    for started in _started.values():
        for proc in started:
            if isinstance(proc, subprocess.Popen):
                kill_group(proc)
    _started.clear()
