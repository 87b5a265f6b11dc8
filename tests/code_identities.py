"""Code identities computed ahead, by a process of their own, for tests that plan or run several recipes.

A recipe's code identity (pgolf.artifact.bundle.code_identity, the CODE_HASH of its shipped train_gpt.py) is
seconds of shrinking; every Snakemake plan of a bundle or gate job and every in-process record run computes it
unless the table cache holds it. A test whose own work leaves a core idle (a run on one thread, a chain of
Snakemake jobs) starts :func:`start` first: the process computes the identities into the session's table cache
(tests/conftest.py: bundle_table_cache) meanwhile, and :func:`wait_for` holds each plan or run until its entry
is there, so that it reads the cache instead of computing the same table beside the process. A hit is exactly
what computing gives (pgolf.artifact.table_cache); a process that failed fails the test that waits on it.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from pgolf.artifact import table_cache
from pgolf.artifact.bundle import PACKAGE_DIR, shipped_recipe
from pgolf.config import RunConfig, load_run_config, to_dict

SCRIPT = """
import sys
import torch  # noqa: F401  (the cache stores a table only once torch is imported: pgolf.artifact.table_cache)
from pgolf.artifact.bundle import code_identity, shipped_recipe
from pgolf.config import load_run_config
for path in sys.argv[1:]:
    code_identity(shipped_recipe(load_run_config(path)))
"""


def start(recipes: list[Path], log: Path) -> Optional[subprocess.Popen]:
    """A process computing the code identity of each recipe file, in the order given (its output goes to ``log``);
    None when there is nothing to compute or the cache is turned off (each plan or run then computes its own)."""
    if not recipes or table_cache.cache_dir() is None:
        return None
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-c", SCRIPT, *map(str, recipes)], stdout=out,
                                stderr=subprocess.STDOUT)
    proc.log = log
    return proc


def wait_for(recipe: Path | RunConfig, proc: Optional[subprocess.Popen], timeout_seconds: float = 300.0) -> None:
    """Until ``proc`` has stored the code identity of ``recipe`` (a recipe file or a config), or has ended (what
    is missing is then computed where it is needed); a process that failed fails the caller with its output."""
    if proc is None:
        return
    cfg = load_run_config(recipe) if isinstance(recipe, Path) else recipe
    key = table_cache.table_key(to_dict(shipped_recipe(cfg)), PACKAGE_DIR)
    deadline = time.monotonic() + timeout_seconds
    while table_cache.load(key) is None and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert proc.poll() in (None, 0), f"computing code identities failed:\n{proc.log.read_text()[-3000:]}"


def stop(proc: Optional[subprocess.Popen]) -> None:
    if proc is not None and proc.poll() is None:
        proc.kill()
        proc.wait()
