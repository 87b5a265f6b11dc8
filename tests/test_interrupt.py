"""Interrupt and resume (issue 19): Ctrl-C during training, then the same command again, completes the run without
extra flags; nothing half-written is left under an output's name; the sweep resumes from its last saved state;
no output is private (mode 0600); a torchrun worker does not outlive its agent.

The pipeline runs for real in a temporary copy of the workflow (Snakefile, rules, scripts and profiles, so that
Snakemake loads profiles/default by itself, as it does for the README's command), on the tiny recipe of
tests/test_workflow.py with data made beforehand.
"""

from __future__ import annotations

import copy
import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from stage_fixtures import TINY_TRAIN
from test_workflow import RECIPE, _set_mtime, seed_synthetic_data

from pgolf.config import to_dict

pytest.importorskip("snakemake")
pytestmark = pytest.mark.slow

RUN = "intr"
# ~20 ms per step on a CPU: 120 steps give the Ctrl-C a window of seconds between step 6 and the end of training
# (with 24 it could land after training had finished and Snakemake removed the whole job's outputs)
ITERATIONS = 120
RESUME_EVERY = 4
STOP_AT_STEP = 6  # Ctrl-C once this step is logged: the state of step 4 is on disk
TRAIN_OUTPUTS = ("train/checkpoint/checkpoint.json", "train/checkpoint/model.pt", "train/train_summary.json",
                 "train/metrics.jsonl")


def _interruptible(umask: int = 0o022):
    """Child setup: its own process group (as a terminal's foreground job), SIGINT at its default (a background
    shell starts children with SIGINT ignored, and ignored-on-entry signals cannot be re-enabled by them), and
    the usual umask."""

    def setup() -> None:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.umask(umask)

    return setup


def _env() -> dict:
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}


def _start(work: Path, log_name: str, *extra: str) -> subprocess.Popen:
    """The README's command, in the workflow folder: `snakemake --cores N --configfile RECIPE`."""
    cmd = [sys.executable, "-m", "snakemake", "--cores", "2", "--configfile", "recipe.yaml", *extra]
    console = open(work / log_name, "w")
    return subprocess.Popen(cmd, cwd=work, stdout=console, stderr=subprocess.STDOUT, env=_env(),
                            start_new_session=True, preexec_fn=_interruptible())


def _processes_in(folder: Path) -> list[str]:
    """Command lines of live processes whose working directory is ``folder`` (the test's own pipeline)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if Path(os.readlink(proc / "cwd")) == folder:
                status = (proc / "status").read_text()
                if "\nState:\tZ" not in status:
                    found.append((proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
        except OSError:
            continue
    return found


def _wait_for(predicate, timeout: float, what: str, poll_seconds: float = 0.5) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(poll_seconds)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _logged_step(log: Path) -> int:
    if not log.exists():
        return 0
    steps = re.findall(r"\[progress\] step (\d+)/", log.read_text(errors="replace"))
    return int(steps[-1]) if steps else 0


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """A workflow copy with verified data and a tokenizer made beforehand (older than the code), nothing else."""
    work = tmp_path_factory.mktemp("interrupt")
    data = seed_synthetic_data(work)
    (data / "verified.json").write_text('{"ok": true}\n')  # what preflight reads of the data verification
    t0 = 1_700_000_000.0
    for script in (work / "workflow" / "scripts").glob("*.py"):
        _set_mtime(script, t0 - 10)
    for i, path in enumerate([work / "docs.jsonl", data / "tokenizer.model", data / "shards", data / "verified.json"]):
        _set_mtime(path, t0 + 10 * i)
    recipe = copy.deepcopy(RECIPE)
    recipe["run"] = RUN
    recipe["train"] = {**to_dict(TINY_TRAIN), "iterations": ITERATIONS, "log_every_steps": 1,
                       "resume_every_steps": RESUME_EVERY}
    (work / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return work


def test_ctrl_c_during_training_then_the_same_command_completes(work: Path) -> None:
    seed_dir = work / "results" / RUN / "seed1"
    first = _start(work, "console1.txt")
    try:
        _wait_for(lambda: _logged_step(seed_dir / "logs" / "train.log") >= STOP_AT_STEP or first.poll() is not None,
                  600, f"training step {STOP_AT_STEP}", poll_seconds=0.05)
        assert first.poll() is None, (work / "console1.txt").read_text()[-4000:]
        os.killpg(first.pid, signal.SIGINT)  # Ctrl-C: the terminal signals the whole foreground group
        first.wait(timeout=120)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    console = (work / "console1.txt").read_text()
    assert first.returncode != 0, console[-3000:]
    # progress reached the console through the tee, labelled; which line depends on timing (the console shows at
    # most one line per 10 s and, at the end, the last one held back), so no particular line is asserted
    assert "train seed 1: " in console

    # nothing half-written under an output's name; the preflight report is a log; a saved state to resume from
    for name in TRAIN_OUTPUTS:
        assert not (seed_dir / name).exists(), name
    assert (seed_dir / "train" / ".metrics.jsonl.partial").exists()
    assert (seed_dir / "logs" / "preflight.json").exists() and not (seed_dir / "train" / "preflight.json").exists()
    assert "pgolf: the run stopped" in console and "the same command resumes" in console
    saved = json.loads((seed_dir / "train" / "resume" / "state.json").read_text())["step"]
    assert saved >= RESUME_EVERY and saved % RESUME_EVERY == 0
    assert not list((work / ".snakemake" / "locks").glob("*")), "Snakemake left its lock"
    _wait_for(lambda: not _processes_in(work), 20, "the pipeline's processes to end")

    # the same command again: no extra flag
    second = _start(work, "console2.txt")
    try:
        second.wait(timeout=900)
    finally:
        if second.poll() is None:
            os.killpg(second.pid, signal.SIGKILL)
    console = (work / "console2.txt").read_text()
    assert second.returncode == 0, console[-4000:]
    assert f"train seed 1: resume: resuming from step {saved}" in console
    assert f"pgolf: run {RUN} (sweep) finished" in console and "report      file://" in console

    summary = json.loads((seed_dir / "train" / "train_summary.json").read_text())
    assert summary["resumed_from_step"] == saved and summary["earlier_attempts"] == 1
    assert summary["steps"] == ITERATIONS
    records = [json.loads(line) for line in (seed_dir / "train" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["event"] == "train_step"] == list(range(1, ITERATIONS + 1))
    assert [r["from_step"] for r in records if r["event"] == "resumed"] == [saved]
    assert not (seed_dir / "train" / "resume").exists()  # removed by the rule once the job succeeded
    # the seed's log holds both attempts: Snakemake deleted the first one's, the copy in train/resume/ carried it
    log = (seed_dir / "logs" / "train.log").read_text()
    first_part, marker, second_part = log.partition("===== the lines above are the log of an earlier attempt")
    assert marker and "[progress] step 1/" in first_part and f"resuming from step {saved}" in second_part
    assert f"[progress] step {ITERATIONS}/" in second_part

    results = work / "results"
    assert not [p for p in results.rglob("*.partial")]
    private = [p for p in results.rglob("*") if stat.S_IMODE(p.stat().st_mode) & 0o044 != 0o044]
    assert not private, [f"{p}: {oct(stat.S_IMODE(p.stat().st_mode))}" for p in private]
    for name in ("submission.json", "report.html", "comply.json"):
        assert (results / RUN / name).exists(), name

    dry = subprocess.run([sys.executable, "-m", "snakemake", "--cores", "2", "--configfile", "recipe.yaml", "-n"],
                         cwd=work, capture_output=True, text=True, env=_env(), timeout=300)
    assert dry.returncode == 0 and "Nothing to be done" in dry.stdout + dry.stderr, (dry.stdout + dry.stderr)[-3000:]


WORKER = """
import os, sys, time
from pgolf.train.distributed import die_with_parent
assert die_with_parent()
open(sys.argv[1], "w").write(str(os.getpid()))
time.sleep(300)
"""


def test_a_torchrun_worker_ends_with_its_agent(tmp_path: Path) -> None:
    """torchrun starts workers in sessions of their own: without PR_SET_PDEATHSIG a SIGKILL to the job's process
    group (kill -9, the OOM killer) would leave the worker running, writing into the seed's folder."""
    script, pid_file = tmp_path / "worker.py", tmp_path / "worker.pid"
    script.write_text(WORKER)
    agent = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", str(script),
         str(pid_file)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env(), start_new_session=True,
    )
    try:
        _wait_for(lambda: pid_file.exists() and pid_file.read_text().strip(), 120, "the worker to start")
        worker = int(pid_file.read_text())
        assert os.getsid(worker) != os.getsid(agent.pid)  # its own session: the group's SIGKILL misses it
        os.killpg(agent.pid, signal.SIGKILL)
        agent.wait(timeout=30)

        def gone() -> bool:
            try:
                return "\nState:\tZ" in Path(f"/proc/{worker}/status").read_text()
            except OSError:
                return True

        _wait_for(gone, 15, f"worker {worker} to end after its agent was killed")
    finally:
        if agent.poll() is None:
            os.killpg(agent.pid, signal.SIGKILL)
