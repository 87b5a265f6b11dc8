"""benchmarks/import_side_by_side.py: the wait for the record's final_model.pt (found wrong on the GPU: the record
copies its own source, which spells ``Serialized model: `` inside an f-string, into the log it writes)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import import_side_by_side as harness  # noqa: E402

SOURCE_IN_LOG = 'Source code:\n        log(f"Serialized model: {model_bytes} bytes")\n'


class FinishedProcess:
    """A record subprocess that has already exited with ``returncode``."""

    def __init__(self, returncode: int):
        self.returncode = returncode

    def poll(self):
        return self.returncode

    def wait(self):
        return self.returncode


class RunningThenDone:
    """Running for ``polls`` checks, then exited 0."""

    def __init__(self, polls: int):
        self.polls, self.returncode = polls, None

    def poll(self):
        self.polls -= 1
        return None if self.polls >= 0 else 0


def write_record_files(work: Path, log: str, stdout: str = "") -> None:
    (work / "record").mkdir(parents=True)
    (work / "record" / "record.txt").write_text(log)
    (work / "record" / "stdout.log").write_text(stdout)


def test_the_source_in_the_log_is_not_the_saved_model(tmp_path, monkeypatch):
    monkeypatch.setattr(harness.time, "sleep", lambda s: None)
    write_record_files(tmp_path, SOURCE_IN_LOG)
    proc = RunningThenDone(polls=3)
    harness.wait_for_final_model(proc, tmp_path)
    assert proc.polls < 0, "returned while the record was still running: it took its source for the save line"


def test_the_save_line_ends_the_wait(tmp_path):
    write_record_files(tmp_path, SOURCE_IN_LOG + "model_params:10\nSerialized model: 135417533 bytes\n")
    proc = RunningThenDone(polls=100)
    harness.wait_for_final_model(proc, tmp_path)
    assert proc.polls > 90, "kept waiting after the save line"


def test_a_record_that_died_before_saving_is_reported(tmp_path):
    write_record_files(tmp_path, SOURCE_IN_LOG, stdout="Traceback ...\nRuntimeError: out of memory\n")
    with pytest.raises(SystemExit, match="(?s)record run failed \\(1\\):.*out of memory"):
        harness.wait_for_final_model(FinishedProcess(1), tmp_path)
