"""Small helpers every stage uses: atomic writes, content hashes, JSON-lines metrics, progress lines, and running
a Snakemake script adapter with its output in the rule's log.

Outputs are written to a temporary sibling and renamed into place, so a killed process never leaves a
half-written file under the final name (and Snakemake never accepts one).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Optional


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
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
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
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary directory beside ``path``; on success it replaces ``path`` whole, on error it is removed.

    An existing ``path`` is only removed after the new directory is complete.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
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


class MetricsLog:
    """JSON lines on rank 0 plus a human progress line (steps, tokens/s, ETA) on stderr."""

    def __init__(self, path: Path | None):
        self.handle = open(path, "a", encoding="utf-8") if path else None

    def write(self, record: dict[str, Any]) -> None:
        if self.handle:
            self.handle.write(json.dumps(record) + "\n")
            self.handle.flush()

    def close(self) -> None:
        if self.handle:
            self.handle.close()


class Progress:
    """Rate and ETA of a scoring pass: a human line on stderr (rank 0) and JSON-lines records via ``write``."""

    def __init__(self, what: str, total_targets: int, total_docs: int, every_seconds: float, is_main: bool = True,
                 write: Optional[Callable[[dict], None]] = None, world_size: int = 1):
        import time

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
        import sys
        import time

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
            print(
                f"[{self.what}] {100.0 * done / self.total_targets:5.1f}% {record['docs_done']:,}/{self.total_docs:,} docs "
                f"{rate / 1e3:,.1f}K tok/s {record['docs_per_s']:,.1f} docs/s elapsed {elapsed:.0f}s eta {eta:.0f}s",
                file=sys.stderr, flush=True,
            )


def run_logged(log_path: str | Path, work: Callable[[], Optional[int]], name: str) -> None:
    """Run a Snakemake ``script:`` adapter's ``work`` with stdout and stderr going to the rule's log file, and exit
    with its status: 2 and a one-line error (in the log) on bad input, else what ``work`` returns (None = 0).

    Why file descriptors and not ``sys.stdout``: the stage's libraries (torch, sentencepiece) also write to them.
    """
    import sys

    from pgolf.config import ConfigError

    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    status = 0
    with open(log_path, "w", encoding="utf-8") as log:
        sys.stdout.flush()
        sys.stderr.flush()
        saved = os.dup(1), os.dup(2)
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            status = int(work() or 0)
        except (ConfigError, ValueError, FileNotFoundError, FileExistsError) as exc:
            print(f"{name}: error: {exc}", file=sys.stderr)
            status = 2
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
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
