"""Small helpers every stage uses: atomic writes, content hashes, JSON-lines metrics, progress lines, running
a Snakemake script adapter with its output in the rule's log, and the log tee of the torchrun rules.

Outputs are written to a temporary sibling and renamed into place, so a killed process never leaves a
half-written file under the final name (and Snakemake never accepts one). Files and folders get the mode the
user's umask allows (0644 / 0755 under the usual 022), as with a plain ``open``; ``tempfile``'s private 0600 would
survive the rename.

Progress: a stage prints its human progress lines through :func:`progress` (marked ``[progress] ``); the full
output goes to the rule's log, and the marked lines also reach the console, labelled and at most one every few
seconds: through :func:`run_logged` for the ``script:`` adapters, through the tee
(``STAGE 2>&1 | python -m pgolf.io LOG --label LABEL``) for the torchrun rules.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import secrets
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, TextIO

_TMP_ATTEMPTS = 100


def _tmp_name(path: Path) -> Path:
    # hidden, in the same folder (the rename stays on one file system), unique per machine, process and call
    return path.with_name(f".{path.name}.{_HOST}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


# the machine in temporary names: on a shared file system only this machine can tell whether their process is alive
_HOST = "".join(c if c.isalnum() or c in "-_" else "_" for c in socket.gethostname()) or "host"


def remove_orphaned_temps(path: str | Path) -> list[Path]:
    """Remove the temporary files and folders beside ``path`` that a process of THIS machine made and that is gone
    (killed with SIGKILL or by the OOM killer, which skip every ``finally``); returns them. One of a live process or
    of another machine is kept: whether that one's maker is alive cannot be known from here."""
    path = Path(path)
    removed = []
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.{_HOST}.*.tmp"):
        pid_text = tmp.name[len(f".{path.name}.{_HOST}."):].split(".")[0]
        if not pid_text.isdigit() or _process_alive(int(pid_text)):
            continue
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        removed.append(tmp)
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def create_temp_file(path: str | Path) -> Path:
    """A new empty file beside ``path``, mode ``0o666 & ~umask`` (the kernel applies the umask; O_EXCL: never an
    existing file)."""
    path = Path(path)
    for _ in range(_TMP_ATTEMPTS):
        tmp = _tmp_name(path)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp
    raise FileExistsError(f"{path}: could not create a temporary file beside it")


def create_temp_dir(path: str | Path) -> Path:
    """A new empty folder beside ``path``, mode ``0o777 & ~umask``."""
    path = Path(path)
    for _ in range(_TMP_ATTEMPTS):
        tmp = _tmp_name(path)
        try:
            os.mkdir(tmp, 0o777)
        except FileExistsError:
            continue
        return tmp
    raise FileExistsError(f"{path}: could not create a temporary folder beside it")


def partial_path(path: str | Path) -> Path:
    """Where a file that grows during a stage (a JSON-lines log) lives until the stage commits it: hidden, beside
    ``path``, so an interrupted stage leaves nothing under the output's name."""
    path = Path(path)
    return path.with_name(f".{path.name}.partial")


def sha256_file(path: str | Path, chunk_bytes: int = 1 << 22) -> str:
    """Hex sha256 of a file's bytes, read in chunks (memory bounded)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def canonical_json(obj: Any) -> str:
    """Deterministic JSON (sorted keys, no spaces): the form that is hashed."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def sha256_json(obj: Any) -> str:
    return sha256_bytes(canonical_json(obj).encode("utf-8"))


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed onto ``path``, on error removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_orphaned_temps(path)  # a killed earlier write's (a checkpoint: up to gigabytes)
    tmp = create_temp_file(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


@contextlib.contextmanager
def atomic_dir(path: str | Path, marker: str) -> Iterator[Path]:
    """Yield a temporary directory beside ``path``; on success it replaces ``path`` whole, on error it is removed.

    An existing ``path`` is only removed after the new directory is complete, and only when it is what this writer
    made before: a directory, empty or holding the file ``marker`` (``manifest.json`` for shards, say). Anything
    else (a file, a folder of the user's) is refused before any work, so that a mistyped path loses nothing.
    """
    path = Path(path)
    if path.exists() or path.is_symlink():
        if not path.is_dir() or path.is_symlink():
            raise FileExistsError(f"{path}: exists and is not a folder; refusing to replace it")
        if any(path.iterdir()) and not (path / marker).is_file():
            raise FileExistsError(f"{path}: a folder that is not empty and holds no {marker} (not an earlier "
                                  "output of this kind); refusing to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    for orphan in remove_orphaned_temps(path):  # a killed earlier attempt's (a full preparation: gigabytes)
        print(f"{path}: removed {orphan.name}, left by a killed earlier attempt", file=sys.stderr)
    tmp = create_temp_dir(path)
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def read_json(path: str | Path, what: str = "file") -> Any:
    """Load JSON with an error that names the file."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: {what} not found") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: {what} is not valid JSON ({exc})") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: {what} is not UTF-8 text, so not JSON ({exc.reason} at byte {exc.start})") from None


def read_json_object(path: str | Path, what: str = "file") -> dict:
    """:func:`read_json` of a file that must hold a JSON object."""
    data = read_json(path, what)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: {what} must be a JSON object, got {type(data).__name__}")
    return data


# ------------------------------------------------------------------------------------------------ measurements

# The fields of pgolf's outputs that are MEASUREMENTS: times, rates, memory, the machine, the date, the attempts.
# They may differ between two runs of identical inputs; every other byte of every output is a function of the
# inputs (tests/test_determinism.py), and no hash covers a field or file named here. Files listed with "*" are
# reports of a run, not content. Paths are dotted; "*" matches any key or list index.
# The training summary's measurements: the training stage keeps them out of the checkpoint's metadata.
TRAIN_SUMMARY_MEASURED_FIELDS: tuple[str, ...] = (
    "train_seconds", "compile_warmup_seconds", "compile_warmup_by_loop_state", "startup_seconds",
    "ms_per_step", "ms_per_step_before_loop", "ms_per_step_after_loop", "tokens_per_s", "peak_memory_gib",
    "peak_memory_reserved_gib", "warmup_peak_memory_reserved_gib", "environment", "attention_backend",
    "resumed_from_step", "earlier_attempts", "cuda_graphs",
)
TIMING_FIELDS: dict[str, tuple[str, ...]] = {
    "prepare_report.json": ("*",),
    "train_summary.json": TRAIN_SUMMARY_MEASURED_FIELDS,
    # per line; a resumed run's log also holds one {"event": "resumed"} line where it resumed
    "metrics.jsonl": (
        "step_ms", "tokens_per_s", "elapsed_s", "peak_memory_gib", "train_seconds", "compile_warmup_seconds",
        "compile_warmup_by_loop_state", "startup_seconds", "ms_per_step", "ms_per_step_before_loop",
        "ms_per_step_after_loop", "peak_memory_reserved_gib", "warmup_peak_memory_reserved_gib", "environment",
        "attention_backend", "resumed_from_step", "earlier_attempts", "cuda_graphs",
    ),
    "hessian_report.json": (
        "train_seconds", "hessian_seconds", "train_plus_hessian_seconds", "data_read_seconds", "forward_seconds",
        "not_counted", "message", "within_budget", "device", "xtx_matmul",
    ),
    "quantize_report.json": ("quantize_seconds",),
    "pack_report.json": ("pack_seconds",),
    # the bundled train_gpt.py's own summary (pgolf.artifact.record_run): its stage times and the measured fields it
    # copies from the stage reports; its log quotes them
    "record_run.json": (
        "stages.*.seconds", "train.train_seconds", "train.ms_per_step", "train.tokens_per_s",
        "hessians.hessian_seconds", "hessians.train_plus_hessian_seconds", "hessians.message", "quantize.seconds",
        "evaluate.total_s",
    ),
    "record_run.log": ("*",),
    "eval.json": ("timings", "budget", "budget_applies", "diagnostics.seconds", "environment", "attention_backend",
                  # the TTT summary's times and rates at depths 0-2: *seconds*, *_s (warmup_s), *per_s (tokens_per_s)
                  "ttt.*seconds*", "ttt.*_s", "ttt.*per_s", "ttt.*.*seconds*", "ttt.*.*_s", "ttt.*.*per_s",
                  "ttt.*.*.*seconds*", "ttt.*.*.*_s", "ttt.*.*.*per_s"),
    "eval_metrics.jsonl": ("*",),
    "aggregate.json": (
        "ms_per_step_mean", "eval_seconds_mean", "provenance.environment", "provenance.hardware", "hardware_words",
        "record_hardware", "verdict.reasons", "compliance.groups.*.rules.*.evidence", "submission_folder",
    ),
    "submission.json": (
        "date", "seed_results.*.step_avg_ms", "seed_results.*.train_time_s", "seed_results.*.eval_time_s",
        "step_avg_ms_mean", "hardware", "provenance.environment", "provenance.hardware", "pytorch_version",
        "cuda_version", "flash_attn_version", "verdict.reasons",
    ),
    "comply.json": ("verdicts.*.evidence",),
    "README.md": ("*",),  # the records folder's: it quotes the times
    "train_seed*.log": ("*",),  # the records folder's seed logs (pgolf.report.folder.seed_log_name): stage times
    "seeds.csv": ("*",),
    "report.html": ("*",),
}


def mask_timings(name: str, obj: Any) -> Any:
    """``obj`` (the parsed content of output file ``name``; a list of records for JSON lines) with every field
    :data:`TIMING_FIELDS` names replaced by ``"<measured>"``: what must be identical between two runs of identical
    inputs."""
    import fnmatch

    patterns = next((v for k, v in TIMING_FIELDS.items() if fnmatch.fnmatchcase(Path(name).name, k)), ())
    if "*" in patterns:
        return "<measured>"
    if str(name).endswith(".jsonl"):
        return [_mask(record, patterns) for record in obj]
    return _mask(obj, patterns)


def _mask(obj: Any, patterns: tuple[str, ...]) -> Any:
    import copy
    import fnmatch

    obj = copy.deepcopy(obj)

    def walk(node: Any, parts: list[str]) -> None:
        if not parts or not isinstance(node, (dict, list)):
            return
        head, rest = parts[0], parts[1:]
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for key, value in list(items):
            if fnmatch.fnmatchcase(str(key), head):
                if rest:
                    walk(value, rest)
                else:
                    node[key] = "<measured>"

    for pattern in patterns:
        walk(obj, pattern.split("."))
    return obj


@contextlib.contextmanager
def exclusive_lock(path: str | Path, what: str) -> Iterator[None]:
    """Hold an exclusive lock on the (empty) file ``path`` for the block, or refuse at once with FileExistsError:
    two processes writing one output folder (a stage orphaned by a killed Snakemake, and its rerun) would mix
    their files. The kernel drops the lock when its holder dies, however it dies."""
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FileExistsError(f"{path.parent}: {what} is already running (another process holds {path.name}); "
                                  "stop it first (a killed Snakemake leaves its jobs running)") from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class MetricsLog:
    """JSON lines on rank 0 (``path`` None: a no-op on the other ranks).

    Lines go to a hidden partial file beside ``path`` (:func:`partial_path`) and :meth:`commit` renames it onto
    ``path`` once the stage's other outputs are written: an interrupted stage never leaves a half-written log under
    the output's name. Opening the log removes an old ``path`` (a rerun starts a fresh log); :meth:`restart`
    starts the partial file over from saved lines (a resumed training run).
    """

    def __init__(self, path: str | Path | None):
        self.path = Path(path) if path else None
        self.partial = partial_path(self.path) if self.path else None
        self.handle: Optional[TextIO] = None
        self.lines: list[str] = []
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.unlink(missing_ok=True)
            self.partial.unlink(missing_ok=True)  # a new file: a writer still holding the old one cannot mix in
            self.handle = open(self.partial, "w", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        if self.handle:
            line = json.dumps(record)
            self.handle.write(line + "\n")
            self.handle.flush()
            self.lines.append(line)

    def restart(self, lines: list[str]) -> None:
        """Start the log over with ``lines`` (the log as it was when a resumed state was saved)."""
        if self.handle is None:
            return
        self.handle.close()
        self.partial.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        self.handle = open(self.partial, "a", encoding="utf-8")
        self.lines = list(lines)

    def commit(self) -> None:
        """Close the log and rename it onto its final name."""
        if self.handle:
            self.handle.flush()
            os.fsync(self.handle.fileno())
            self.handle.close()
            self.handle = None
            os.replace(self.partial, self.path)

    def close(self) -> None:
        """Close without committing (the partial file stays for a post-mortem)."""
        if self.handle:
            self.handle.close()
            self.handle = None


# ----------------------------------------------------------------------------------------------------- progress

PROGRESS_MARK = "[progress] "
CONSOLE_EVERY_SECONDS = 10.0


class ConsoleLines:
    """Labelled progress lines onto a console stream, at most one every ``every`` seconds; :meth:`close` shows the
    last line held back, so the console always ends on a stage's final state."""

    def __init__(self, stream: TextIO, label: str, every: float = CONSOLE_EVERY_SECONDS):
        self.stream = stream
        self.label = label
        self.every = every
        self.last_shown = -float("inf")
        self.pending: Optional[str] = None

    def show(self, text: str, force: bool = False) -> None:
        line = f"{self.label}: {text}" if self.label else text
        now = time.monotonic()
        if force or now - self.last_shown >= self.every:
            self._emit(line)
            self.last_shown, self.pending = now, None
        else:
            self.pending = line

    def _emit(self, line: str) -> None:
        try:
            self.stream.write(line + "\n")
            self.stream.flush()
        except (OSError, ValueError):  # a closed console never fails the stage
            pass

    def close(self) -> None:
        if self.pending is not None:
            self._emit(self.pending)
            self.pending = None


_console: Optional[ConsoleLines] = None  # set by run_logged while a script adapter's work runs


def progress(text: str, final: bool = False) -> None:
    """A human progress line: ``[progress] text`` on stderr (the rule's log; the tee of the torchrun rules forwards
    it to the console), and straight onto the console inside :func:`run_logged`. ``final``: a stage's closing
    line, never held back by the rate limit."""
    print(PROGRESS_MARK + text, file=sys.stderr, flush=True)
    if _console is not None:
        _console.show(text, force=final)


def rate_text(per_second: float, unit: str) -> str:
    """``812 tok/s``, ``6.5K tok/s``, ``1.23M tok/s``."""
    for scale, suffix in ((1e6, "M"), (1e3, "K")):
        if per_second >= scale:
            return f"{per_second / scale:,.{1 if suffix == 'K' else 2}f}{suffix} {unit}/s"
    return f"{per_second:,.0f} {unit}/s" if per_second >= 10 else f"{per_second:.2g} {unit}/s"


class Countdown:
    """``WHAT 12/66, elapsed 40s, eta 180s`` progress lines for a loop of known length, at most one every
    ``every`` seconds (the first and the last always)."""

    def __init__(self, what: str, total: int, every: float = 5.0):
        self.what, self.total, self.every = what, max(int(total), 1), every
        self.start = self.last = time.perf_counter()

    def update(self, done: int, detail: str = "") -> None:
        now = time.perf_counter()
        if done not in (1, self.total) and now - self.last < self.every:
            return
        self.last = now
        elapsed = now - self.start
        eta = elapsed * (self.total - done) / max(done, 1)
        progress(f"{self.what} {done}/{self.total}{', ' + detail if detail else ''}, elapsed {elapsed:.0f}s"
                 + (f", eta {eta:.0f}s" if done < self.total else ""), final=done == self.total)


class Progress:
    """Rate and ETA of a scoring pass: a human progress line (rank 0) and JSON-lines records via ``write``."""

    def __init__(self, what: str, total_targets: int, total_docs: int, every_seconds: float, is_main: bool = True,
                 write: Optional[Callable[[dict], None]] = None, world_size: int = 1):
        self.what = what
        self.total_targets = max(total_targets, 1)
        self.total_docs = total_docs
        self.every_seconds = every_seconds
        self.is_main = is_main
        self.write = write
        self.world_size = world_size  # local counts are scaled by it for the global estimate
        self.start = time.perf_counter()
        self.last = self.start
        self.targets = 0
        self.docs = 0

    def update(self, targets: int, docs: int = 0, force: bool = False, **extra) -> None:
        self.targets += targets
        self.docs += docs
        now = time.perf_counter()
        if not force and now - self.last < self.every_seconds:
            return
        self.last = now
        elapsed = max(now - self.start, 1e-9)
        done = min(self.targets * self.world_size, self.total_targets)
        rate = done / elapsed
        eta = (self.total_targets - done) / rate if rate > 0 else float("inf")
        record = {
            "event": "eval_progress", "what": self.what, "targets_done": done, "targets_total": self.total_targets,
            "docs_done": min(self.docs * self.world_size, self.total_docs), "docs_total": self.total_docs,
            "tokens_per_s": rate, "docs_per_s": self.docs * self.world_size / elapsed, "elapsed_s": elapsed,
            "eta_s": eta, **extra,
        }
        if self.write is not None:
            self.write(record)
        if self.is_main:
            progress(
                f"{self.what} {100.0 * done / self.total_targets:5.1f}% {record['docs_done']:,}/{self.total_docs:,} docs "
                f"{rate_text(rate, 'tok')} {rate_text(record['docs_per_s'], 'docs')} elapsed {elapsed:.0f}s "
                f"eta {eta:.0f}s"
            )


def run_logged(log_path: str | Path, work: Callable[[], Optional[int]], name: str,
               console_every: float = CONSOLE_EVERY_SECONDS) -> None:
    """Run a Snakemake ``script:`` adapter's ``work`` with stdout and stderr going to the rule's log file, and exit
    with its status: 2 and a one-line error (in the log) on bad input, else what ``work`` returns (None = 0).
    Progress lines (:func:`progress`) also reach the console, labelled ``name``.

    Why file descriptors and not ``sys.stdout``: the stage's libraries (torch, sentencepiece) also write to them.
    Any other exception's traceback goes to the log too (the console's failure hint shows the log's tail); SIGTERM
    and SIGHUP become KeyboardInterrupt, so that the stage's cleanup (temporary folders, partial files) runs.
    """
    global _console
    import signal
    import traceback

    from pgolf.config import ConfigError

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")

    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, interrupt)

    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    status = 0
    with open(log_path, "w", encoding="utf-8") as log:
        sys.stdout.flush()
        sys.stderr.flush()
        saved = os.dup(1), os.dup(2)
        console_stream = os.fdopen(os.dup(saved[1]), "w", encoding="utf-8", errors="replace")
        _console = ConsoleLines(console_stream, name, console_every)
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            status = int(work() or 0)
        except (ConfigError, ValueError, OSError) as exc:
            print(f"{name}: error: {exc}", file=sys.stderr)
            status = 2
        except BaseException:
            traceback.print_exc()  # into the log, while stderr still goes there
            raise
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            _console.close()
            _console = None
            console_stream.close()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
    if status:
        print(f"{name}: failed with status {status}; see {log_path}", file=sys.stderr)
        raise SystemExit(status)


def set_cpu_threads(n: int) -> int:
    """Set torch's intra-op CPU thread count to ``n`` for this process and return the previous count; ``n == 0``
    leaves it as it is.

    Why a stage calls this itself: a CPU float sum (a matmul, ``x.T @ x`` of the Hessians, GPTQ's updates) splits
    its work by thread, so its last bits depend on the thread count. Snakemake exports ``OMP_NUM_THREADS`` = the
    rule's ``threads``, torchrun 1 per process with several processes, a plain run the core count: the stages set
    their recipe's ``cpu_threads`` so that the staged pipeline and train_gpt.py compute the same numbers.
    """
    import torch

    previous = torch.get_num_threads()
    if n > 0 and n != previous:
        torch.set_num_threads(n)
    return previous
# ---------------------------------------------------------------------------------------------------------- tee


def tee(lines: Iterator[bytes], log_path: str | Path, console: ConsoleLines,
        carry_path: str | Path | None = None) -> None:
    """Append every line to the log (flushed per line) and show the progress lines on the console.

    ``carry_path``: a copy of the log that outlives the job (the training rule's ``train/resume/train.log``,
    removed with that folder once the job succeeded). Snakemake deletes a job's log before it runs the job again,
    so an interrupted job's copy is written at the top of the new log first: a resumed training's log then holds
    the steps before the interruption too. Every line goes to both files."""
    with contextlib.ExitStack() as files:
        logs = [files.enter_context(open(log_path, "a", encoding="utf-8", errors="replace"))]
        if carry_path is not None:
            carry_path = Path(carry_path)
            carry_path.parent.mkdir(parents=True, exist_ok=True)
            earlier = carry_path.read_text(encoding="utf-8", errors="replace") if carry_path.exists() else ""
            logs.append(files.enter_context(open(carry_path, "a", encoding="utf-8", errors="replace")))
            if earlier:
                cut = "" if earlier.endswith("\n") else "\n"
                logs[0].write(earlier + cut)
                logs[1].write(cut)
                for out in logs:
                    out.write(f"===== the lines above are the log of an earlier attempt that did not finish (kept in "
                              f"{carry_path}); this attempt starts here =====\n")
                    out.flush()
        for raw in lines:
            line = raw.decode("utf-8", errors="replace")
            for out in logs:
                out.write(line)
                out.flush()
            if line.startswith(PROGRESS_MARK):
                console.show(line[len(PROGRESS_MARK):].rstrip())
    console.close()


def tee_main(argv: Optional[list[str]] = None) -> int:
    """``STAGE 2>&1 | python -m pgolf.io LOG --label LABEL`` (the torchrun rules): the stage's whole output into LOG,
    its progress lines onto the console (stderr), labelled.

    It ignores SIGINT, SIGHUP and SIGTERM (Ctrl-C, a closed terminal, a stop): it keeps draining the pipe, so the
    stage's last words reach the log, and exits at the end of its input with status 0 (the job's status is the
    stage's, through ``set -o pipefail``). Stdlib only:
    it never imports torch.
    """
    import argparse
    import signal

    parser = argparse.ArgumentParser(prog="python -m pgolf.io", description=tee_main.__doc__.split("\n")[0])
    parser.add_argument("log", help="log file, appended to")
    parser.add_argument("--label", required=True, help="console prefix, e.g. 'train seed 1'")
    parser.add_argument("--every", type=float, default=CONSOLE_EVERY_SECONDS,
                        help="at most one console line per this many seconds (the last one is always shown)")
    parser.add_argument("--carry", default=None, metavar="PATH",
                        help="a copy of the log kept across attempts: written first into LOG when it exists, then "
                        "appended to like LOG (the caller removes it once the job succeeded)")
    args = parser.parse_args(argv)
    for signum in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)
    tee(iter(sys.stdin.buffer.readline, b""), args.log, ConsoleLines(sys.stderr, args.label, args.every), args.carry)
    return 0


if __name__ == "__main__":
    sys.exit(tee_main())
