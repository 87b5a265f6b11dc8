"""Shared test fixtures: paths of the repository, the shipped test data and the bundled corpus."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from datafiles import CONFORMANCE_DIR, PUBLISHED_TOKENIZER, REPO_ROOT, SAMPLE_DOCS  # noqa: F401


@pytest.fixture
def published_tokenizer() -> Path:
    return PUBLISHED_TOKENIZER


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one CPU thread for a module of tiny-tensor tests (one thread is faster there, and CI's 2 cores
    are shared); the thread count is restored after the module. Use: ``pytestmark = pytest.mark.usefixtures(...)``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)



@pytest.fixture(scope="session")
def shipped_form():
    """``shipped_form(cfg)``: ``build_bundle(cfg, minify=True)``, built once per recipe in a session and shared by
    the tests that read a recipe's shipped form (its modules, text or report): seconds of shrinking each time,
    for the same bundle (build_bundle is deterministic: tests/test_bundle.py). Read it, never change it."""
    from pgolf.artifact.bundle import build_bundle
    from pgolf.config import to_dict
    from pgolf.io import canonical_json

    built = {}

    def get(cfg):
        key = canonical_json(to_dict(cfg))
        if key not in built:
            built[key] = build_bundle(cfg, minify=True)
        return built[key]

    return get


@pytest.fixture(scope="session", autouse=True)
def bundle_table_cache(tmp_path_factory):
    """The bundle's module-table cache (pgolf.artifact.table_cache) in a folder of this session, for the tests and
    the Snakemake runs they start: every session computes its tables once (none comes from an earlier session or
    the user's ~/.cache) and the tests write nothing into the user's home."""
    before = os.environ.get("PGOLF_CACHE_DIR")
    os.environ["PGOLF_CACHE_DIR"] = str(tmp_path_factory.mktemp("pgolf_cache"))
    yield
    if before is None:
        os.environ.pop("PGOLF_CACHE_DIR", None)
    else:
        os.environ["PGOLF_CACHE_DIR"] = before


@pytest.fixture(scope="session", autouse=True)
def early_runs_started(request, bundle_table_cache, tmp_path_factory):
    """Start now the long serial runs that a selected test reads later (tests/early_runs.py): the reproduce test's
    staged pipeline (~45 s on CI's two cores), beside the tests before it, which mostly leave one core idle
    (test_bundle + test_reproduce: ~129 s -> ~99 s wall, two A/B rounds). After the table cache is set up, so the
    run shares the session's cache like the test's own run would. (The workflow test's base run started the same
    way gained ~7 s, within the noise: that test already runs its code identities beside it.)"""
    import importlib.util

    import early_runs

    def selected(module: str, fixture: str) -> bool:
        return any(Path(str(item.fspath)).name == module and fixture in getattr(item, "fixturenames", ())
                   for item in request.session.items)

    # PGOLF_TEST_EARLY_RUNS=0: each test starts its own run when it needs it (to time the difference)
    if importlib.util.find_spec("snakemake") is not None and os.environ.get("PGOLF_TEST_EARLY_RUNS") != "0":
        if selected("test_reproduce.py", "pipeline") and not os.environ.get("PGOLF_REPRO_WORKDIR"):
            import test_reproduce

            early_runs.start(test_reproduce.EARLY_RUN,
                             lambda: test_reproduce.start_pipeline(tmp_path_factory.mktemp("repro")))
    yield
    early_runs.stop_all()
