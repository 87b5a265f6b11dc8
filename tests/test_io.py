"""pgolf.io: outputs follow the umask; JSON-lines logs are never half-written under their final name; the log tee
of the torchrun rules; progress lines reach the console from script adapters; the measured fields are masked."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pgolf.io import (
    PROGRESS_MARK,
    ConsoleLines,
    MetricsLog,
    atomic_dir,
    mask_timings,
    partial_path,
    rate_text,
    tee,
)

MODES = """
import os, stat, sys
from pathlib import Path
from pgolf.io import atomic_dir, atomic_write_bytes, atomic_write_json
os.umask(int(sys.argv[2], 8))
root = Path(sys.argv[1])
atomic_write_json(root / "a.json", {"x": 1})
atomic_write_bytes(root / "b.bin", b"x")
with atomic_dir(root / "folder", "inside.txt") as tmp:
    (tmp / "inside.txt").write_text("x")
print(" ".join(oct(stat.S_IMODE((root / n).stat().st_mode)) for n in ("a.json", "b.bin", "folder")))
"""


@pytest.mark.parametrize("umask, expected", [("022", "0o644 0o644 0o755"), ("077", "0o600 0o600 0o700"),
                                             ("002", "0o664 0o664 0o775")])
def test_atomic_outputs_follow_the_umask(tmp_path: Path, umask: str, expected: str) -> None:
    done = subprocess.run([sys.executable, "-c", MODES, str(tmp_path), umask], capture_output=True, text=True,
                          check=True)
    assert done.stdout.strip() == expected
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.bin", "folder"]  # no temporary left


def test_a_failed_atomic_write_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "out", "marker") as tmp:
            (tmp / "half").write_text("x")
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_a_killed_writers_temporary_folder_goes_on_the_next_attempt(tmp_path: Path) -> None:
    """SIGKILL skips every ``finally``: the next atomic_dir of the same output removes the folder the dead process
    left, and keeps one whose process lives or that another machine made (it cannot see that one's process)."""
    import pgolf.io as io_module

    out = tmp_path / "shards"
    killed = subprocess.run([sys.executable, "-c", (
        "import os, sys; sys.path.insert(0, sys.argv[2]); from pgolf.io import create_temp_dir; "
        "tmp = create_temp_dir(sys.argv[1]); open(os.path.join(tmp, 'half'), 'w').write('x'); "
        "os.kill(os.getpid(), 9)"), str(out), str(Path(io_module.__file__).parents[1])], capture_output=True)
    assert killed.returncode == -9
    (orphan,) = tmp_path.glob(".shards.*.tmp")
    alive = tmp_path / f".shards.{io_module._HOST}.{os.getpid()}.0000abcd.tmp"
    elsewhere = tmp_path / ".shards.another-host.1.0000abcd.tmp"
    alive.mkdir()
    elsewhere.mkdir()
    with atomic_dir(out, "manifest.json") as tmp:
        (tmp / "manifest.json").write_text("{}")
    assert not orphan.exists() and alive.is_dir() and elsewhere.is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([alive.name, elsewhere.name, "shards"])



def test_a_killed_writers_temporary_file_goes_on_the_next_write(tmp_path: Path) -> None:
    """The same for single files (a checkpoint or Hessians file half written when the OOM killer struck): the next
    atomic write of that output removes the dead process's temporary file, and keeps a live one's."""
    import pgolf.io as io_module
    from pgolf.io import atomic_write_bytes

    out = tmp_path / "model.pt"
    killed = subprocess.run([sys.executable, "-c", (
        "import os, sys; sys.path.insert(0, sys.argv[2]); from pgolf.io import create_temp_file; "
        "tmp = create_temp_file(sys.argv[1]); open(tmp, 'wb').write(b'half'); os.kill(os.getpid(), 9)"),
        str(out), str(Path(io_module.__file__).parents[1])], capture_output=True)
    assert killed.returncode == -9
    (orphan,) = tmp_path.glob(".model.pt.*.tmp")
    alive = tmp_path / f".model.pt.{io_module._HOST}.{os.getpid()}.0000abcd.tmp"
    alive.write_bytes(b"in progress")
    atomic_write_bytes(out, b"whole")
    assert not orphan.exists() and alive.exists() and out.read_bytes() == b"whole"

def test_an_atomic_folder_replaces_only_what_its_writer_made(tmp_path: Path) -> None:
    """An earlier output (holding the marker) or an empty folder is replaced; a file or a folder of the user's is
    refused before the work starts, and stays as it was."""
    out = tmp_path / "out"
    for _ in range(2):  # the second time over the first output
        with atomic_dir(out, "manifest.json") as tmp:
            (tmp / "manifest.json").write_text("{}")
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json"]
    (tmp_path / "empty").mkdir()
    with atomic_dir(tmp_path / "empty", "manifest.json") as tmp:
        (tmp / "manifest.json").write_text("{}")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    (tmp_path / "a_file").write_text("keep")
    for target, message in ((mine, "not empty and holds no manifest.json"), (tmp_path / "a_file", "not a folder")):
        started = []
        with pytest.raises(FileExistsError, match=message):
            with atomic_dir(target, "manifest.json"):
                started.append(True)
        assert not started
    assert (mine / "notes.txt").read_text() == "keep" and (tmp_path / "a_file").read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "empty", "mine", "out"]  # no temporary left


def test_metrics_log_is_renamed_into_place_only_when_committed(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"event": "old"}\n')  # a rerun starts a fresh log: the old one goes at once
    log = MetricsLog(path)
    assert not path.exists()
    log.write({"event": "train_step", "step": 1})
    assert not path.exists() and partial_path(path).exists()
    log.restart(['{"event": "train_step", "step": 1}', '{"event": "train_step", "step": 2}'])
    log.write({"event": "resumed", "from_step": 2})
    log.commit()
    assert not partial_path(path).exists()
    assert [json.loads(line)["event"] for line in path.read_text().splitlines()] == ["train_step", "train_step",
                                                                                     "resumed"]
    MetricsLog(None).write({"event": "x"})  # the other ranks: nothing


TEE_INPUT = """
import sys, time
for i in range(1, 6):
    print(f"plain line {i}", flush=True)
    print(f"[progress] step {i}/5", flush=True)
    time.sleep(0.05)
print("Traceback: the last words", flush=True)
"""


def test_tee_writes_everything_to_the_log_and_progress_to_the_console(tmp_path: Path) -> None:
    log = tmp_path / "train.log"
    producer = subprocess.Popen([sys.executable, "-c", TEE_INPUT], stdout=subprocess.PIPE)
    tee = subprocess.run([sys.executable, "-m", "pgolf.io", str(log), "--label", "train seed 1", "--every", "60"],
                         stdin=producer.stdout, capture_output=True, text=True, timeout=60)
    producer.wait()
    assert tee.returncode == 0 and tee.stdout == ""
    text = log.read_text()
    assert text.count("plain line") == 5 and text.count("[progress] step") == 5 and "the last words" in text
    # rate-limited: the first line at once, the last one held back and shown at the end
    assert tee.stderr.splitlines() == ["train seed 1: step 1/5", "train seed 1: step 5/5"]


def test_tee_carries_an_unfinished_attempts_log_into_the_next_one(tmp_path: Path) -> None:
    """Snakemake deletes a job's log before running it again: the training rule's copy under train/resume/ is
    written first into the new log, so a resumed training's log still holds the steps before the interruption."""
    log, carry = tmp_path / "logs" / "train.log", tmp_path / "train" / "resume" / "train.log"
    log.parent.mkdir()
    console = ConsoleLines(io.StringIO(), "train seed 1", 60.0)
    tee(iter([b"step 1\n", b"step 2 (interrupted, no newline)"]), log, console, carry)
    assert carry.read_text() == log.read_text() == "step 1\nstep 2 (interrupted, no newline)"
    log.unlink()  # what Snakemake does before the job runs again
    tee(iter([b"resuming from step 1\n", b"step 2\n"]), log, ConsoleLines(io.StringIO(), "x", 60.0), carry)
    lines = log.read_text().splitlines()
    assert lines[:2] == ["step 1", "step 2 (interrupted, no newline)"]
    assert lines[2].startswith("===== the lines above are the log of an earlier attempt that did not finish")
    assert lines[3:] == ["resuming from step 1", "step 2"]
    assert carry.read_text() == log.read_text()  # a third attempt would start with both
    # without a copy (the first attempt, or after the rule removed it): the log alone
    other = tmp_path / "other.log"
    tee(iter([b"one\n"]), other, ConsoleLines(io.StringIO(), "x", 60.0), tmp_path / "none" / "train.log")
    assert other.read_text() == "one\n"


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGHUP, signal.SIGTERM])
def test_tee_survives_ctrl_c_and_drains_its_input(tmp_path: Path, signum) -> None:
    """On Ctrl-C (a closed terminal, a stop) the whole process group gets the signal: the tee keeps reading, so
    the stage's traceback still reaches the log, and ends at the end of its input."""
    log = tmp_path / "eval.log"
    tee = subprocess.Popen([sys.executable, "-m", "pgolf.io", str(log), "--label", "x"], stdin=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, preexec_fn=lambda: signal.signal(signal.SIGINT,
                                                                                            signal.SIG_DFL))
    tee.stdin.write("first\n")
    tee.stdin.flush()
    time.sleep(1.5)  # the tee has started and set its handler
    tee.send_signal(signum)
    time.sleep(0.3)
    tee.stdin.write("after the interrupt\n")
    tee.stdin.close()
    assert tee.wait(timeout=30) == 0
    assert log.read_text() == "first\nafter the interrupt\n"


ADAPTER = """
import sys
from pgolf.io import progress, run_logged

def work():
    print("detail only for the log")
    progress("stage half done")
    progress("stage done", final=True)
    return 0

run_logged(sys.argv[1], work, "pack seed 1", console_every=60.0)
"""


def test_run_logged_sends_progress_to_the_console_and_the_rest_to_the_log(tmp_path: Path) -> None:
    """A Snakemake script adapter: the stage's output goes to the rule's log, its progress lines also (labelled,
    rate-limited, the last one always) to the console."""
    log = tmp_path / "pack.log"
    done = subprocess.run([sys.executable, "-c", ADAPTER, str(log)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines() == ["pack seed 1: stage half done", "pack seed 1: stage done"]
    assert done.stdout == ""
    assert log.read_text().splitlines() == ["detail only for the log", PROGRESS_MARK + "stage half done",
                                            PROGRESS_MARK + "stage done"]


FAILING_ADAPTER = """
import os, signal, sys, time
from pathlib import Path
from pgolf.io import atomic_dir, run_logged

def work():
    if sys.argv[2] == "raise":
        raise RuntimeError("an unexpected failure")
    with atomic_dir(Path(sys.argv[3]) / "shards", "manifest.json") as tmp:
        (tmp / "half").write_text("x")
        print("stopping", flush=True)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)

run_logged(sys.argv[1], work, "prepare")
"""


def test_run_logged_logs_a_traceback_and_cleans_up_on_sigterm(tmp_path: Path) -> None:
    """An unexpected exception's traceback goes to the rule's log (what the failure hint shows), and a stop
    (SIGTERM, a closed terminal) unwinds the stage, so its temporary folder is removed."""
    log = tmp_path / "a.log"
    done = subprocess.run([sys.executable, "-c", FAILING_ADAPTER, str(log), "raise", str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "RuntimeError: an unexpected failure" in log.read_text()
    done = subprocess.run([sys.executable, "-c", FAILING_ADAPTER, str(log), "stop", str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "KeyboardInterrupt: signal SIGTERM" in log.read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.log"]  # no hidden temporary folder left


def test_console_lines_hold_back_and_show_the_last() -> None:
    stream = io.StringIO()
    lines = ConsoleLines(stream, "evaluate seed 2", every=60.0)
    for i in range(4):
        lines.show(f"{i}")
    lines.close()
    assert stream.getvalue().splitlines() == ["evaluate seed 2: 0", "evaluate seed 2: 3"]


def test_mask_timings_and_rates() -> None:
    report = {"val_bpb": 1.0, "timings": {"total_s": 3.0}, "ttt": {"phases": [{"seconds": 2.0, "tokens": 5}]}}
    assert mask_timings("eval.json", report) == {"val_bpb": 1.0, "timings": "<measured>",
                                                 "ttt": {"phases": [{"seconds": "<measured>", "tokens": 5}]}}
    assert mask_timings("train/metrics.jsonl", [{"step": 1, "step_ms": 3.0}]) == [{"step": 1, "step_ms": "<measured>"}]
    assert mask_timings("report.html", "<html>") == "<measured>"
    run = {"stages": {"train": {"seconds": 1.5, "status": 0}}, "train": {"steps": 3, "ms_per_step": 52.0},
           "pack": {"artifact_sha256": "ab", "model_bytes": 10}, "evaluate": {"val_bpb": 2.0, "total_s": 0.9}}
    assert mask_timings("seed1/record_run.json", run) == {  # the bundled train_gpt.py's summary
        "stages": {"train": {"seconds": "<measured>", "status": 0}}, "train": {"steps": 3, "ms_per_step": "<measured>"},
        "pack": {"artifact_sha256": "ab", "model_bytes": 10}, "evaluate": {"val_bpb": 2.0, "total_s": "<measured>"}}
    assert [rate_text(x, "tok") for x in (3.2, 812, 6_500, 1_234_567)] == ["3.2 tok/s", "812 tok/s", "6.5K tok/s",
                                                                           "1.23M tok/s"]
