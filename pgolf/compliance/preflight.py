"""``pgolf preflight --config FILE [--data-dir D] [--json-out F]``: can this machine run this recipe?

Checked in seconds, before any GPU time is spent: the recipe parses; the Python packages import (triton only
where CUDA is; FlashAttention-3 is optional); the binaries the recipe needs are on PATH (torchrun, and lrzip when
the compressor is lrzip); the GPUs (model, count) and the torch/CUDA versions; the batch splits evenly over the
GPUs; free disk; the data is present and verified (``verified.json`` passed, or the verification is run now when
only the shards exist). In record mode the hardware must be 8 GPUs whose name contains H100. Every failure is
listed at once; the exit status is 1 if a required check failed.
"""

from __future__ import annotations

import dataclasses
import importlib
import shutil
import sys
from pathlib import Path
from typing import Optional, Sequence

from pgolf.compliance.provenance import RECORD_GPU_COUNT, RECORD_GPU_NAME, is_record_gpu
from pgolf.config import ConfigError, RunConfig, load_run_config
from pgolf.io import read_json

MIN_TORCH = (2, 11)
WORK_SPACE_BYTES = 4 * 1024**3  # checkpoints, Hessians, artifacts and logs of a few seeds
GIB = 1024**3


@dataclasses.dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    required: bool = True

    @property
    def status(self) -> str:
        if self.ok:
            return "PASS"
        return "FAIL" if self.required else "WARN"


# --------------------------------------------------------------------------------------------------------------
# Individual checks (pure where they can be)
# --------------------------------------------------------------------------------------------------------------


def import_check(module: str, required: bool = True, why: str = "") -> Check:
    try:
        mod = importlib.import_module(module)
    except Exception as exc:  # noqa: BLE001 - a broken install raises more than ImportError
        hint = f" ({why})" if why else ""
        return Check(f"import {module}", False, f"cannot import: {type(exc).__name__}: {exc}{hint}", required)
    version = getattr(mod, "__version__", None)
    return Check(f"import {module}", True, f"version {version}" if version else "importable", required)


def binary_check(name: str, why: str, required: bool = True) -> Check:
    path = shutil.which(name)
    if path:
        return Check(f"binary {name}", True, path, required)
    return Check(f"binary {name}", False, f"not on PATH ({why})", required)


def hardware_check(mode: str, gpu_names: Sequence[str]) -> Check:
    """Record mode: exactly 8 GPUs, each an H100 SXM. Sweep mode: anything (CPU included), reported."""
    found = (
        f"{len(gpu_names)} x {gpu_names[0]}"
        if gpu_names and len(set(gpu_names)) == 1
        else (", ".join(gpu_names) if gpu_names else "no CUDA GPU")
    )
    if mode != "record":
        return Check("hardware", True, f"{found} (sweep mode: any hardware)")
    if len(gpu_names) == RECORD_GPU_COUNT and all(is_record_gpu(name) for name in gpu_names):
        return Check("hardware", True, f"{found}: record-track hardware")
    return Check(
        "hardware",
        False,
        f"record-track hardware check: found {found}, need {RECORD_GPU_COUNT} x {RECORD_GPU_NAME} SXM "
        "(sweep mode allows it)",
    )


def torch_version_check(version: str) -> Check:
    try:
        major, minor = (int(part) for part in version.split("+")[0].split(".")[:2])
    except ValueError:
        return Check("torch version", False, f"cannot parse torch version {version!r}")
    ok = (major, minor) >= MIN_TORCH
    return Check("torch version", ok, f"torch {version}" + ("" if ok else f": need >= {MIN_TORCH[0]}.{MIN_TORCH[1]}"))


def batch_split_check(cfg: RunConfig, world_size: int) -> Check:
    from pgolf.data.loader import BatchPlan

    try:
        plan = BatchPlan(cfg.train.train_batch_tokens, cfg.train.micro_batch_tokens, world_size)
    except ValueError as exc:
        return Check("batch split", False, f"{world_size} process(es): {exc}")
    return Check(
        "batch split",
        True,
        f"{world_size} process(es) x {plan.grad_accum_steps} accumulation step(s) of "
        f"{cfg.train.micro_batch_tokens:,} tokens = {cfg.train.train_batch_tokens:,}",
    )


def disk_check(path: Path, need_bytes: int) -> Check:
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    ok = free >= need_bytes
    return Check("free disk", ok, f"{free / GIB:.1f} GiB free at {probe}, need about {need_bytes / GIB:.1f} GiB")


def data_paths(cfg: RunConfig, data_dir: Optional[str | Path]) -> tuple[Path, Path]:
    """(data root holding verified.json, shards directory). ``data_dir`` may name either."""
    if data_dir is None:
        root = Path("results") / "data" / cfg.data.name
        return root, root / "shards"
    data_dir = Path(data_dir)
    if (data_dir / "shards").is_dir() or (data_dir / "verified.json").exists():
        return data_dir, data_dir / "shards"
    if (data_dir / "manifest.json").exists() or any(data_dir.glob("fineweb_*.bin")):
        return data_dir.parent, data_dir
    return data_dir, data_dir / "shards"


# data.train_shards 0 asks for every train shard, a count preflight cannot know before the download: it reserves
# at least what the official downloader fetches by default (shared/spec/data.md), as a lower bound
ALL_TRAIN_SHARDS_AT_LEAST = 80


def data_size_bytes(cfg: RunConfig) -> int:
    """Disk the data stage would need: uint16 train shards (+ validation and sidecar, about 0.3 GB)."""
    if cfg.data.source == "local":
        return 0
    shards = cfg.data.train_shards or ALL_TRAIN_SHARDS_AT_LEAST
    return shards * cfg.data.shard_tokens * 2 + 300_000_000


def data_check(cfg: RunConfig, root: Path, shards: Path, verify_now: bool) -> Check:
    verified = root / "verified.json"
    if verified.exists():
        try:
            report = read_json(verified, "data verification report")
        except ValueError as exc:
            return Check("data verified", False, str(exc))
        if not isinstance(report, dict) or report.get("ok") is not True:
            failed = (
                [f"{c.get('name')}: {c.get('detail')}" for c in (report.get("checks") or []) if not c.get("ok")]
                if isinstance(report, dict)
                else []
            )
            return Check(
                "data verified", False, f"{verified}: verification FAILED: " + ("; ".join(failed) or "ok is not true")
            )
        summary = report.get("summary") or {}
        val_docs = summary.get("val_docs")
        if val_docs is not None and val_docs != cfg.data.val_docs:
            return Check(
                "data verified", False, f"{verified}: {val_docs} validation docs, the recipe wants {cfg.data.val_docs}"
            )
        if not shards.is_dir():
            return Check("data verified", False, f"{verified} passed, but the shards directory {shards} is gone")
        overlap = summary.get("train_val_overlap_docs")
        return Check(
            "data verified",
            True,
            f"{verified}: passed ({val_docs} val docs, {summary.get('train_shards')} train shards"
            + (f", {overlap} val docs also in train, accepted as published" if overlap else "")
            + ")",
        )
    if not shards.is_dir():
        if cfg.data.source == "local" and cfg.data.docs_path and Path(cfg.data.docs_path).is_file():
            # documents on this machine: the pipeline's data stage builds the shards here, no network needed
            return Check("data verified", False, f"{shards}: no shards yet; the data stage will build them from "
                         f"{cfg.data.docs_path}", required=False)
        return Check(
            "data verified",
            False,
            f"{shards}: no shards (and no {verified}); run the data stage first or "
            "carry the data (the GPU machine has no network)",
        )
    if not verify_now:
        return Check("data verified", False, f"{verified} missing; shards exist at {shards} (run `pgolf data verify`)")
    from pgolf.data.verify import verify_dir

    print(f"preflight: no {verified}; verifying {shards} now (reads every shard)", file=sys.stderr, flush=True)
    report = verify_dir(
        shards,
        expected_val_docs=cfg.data.val_docs,
        record=cfg.mode == "record",
        val_duplicates_policy=cfg.data.val_duplicates_policy,
        max_val_overlap_fraction=cfg.data.max_val_overlap_fraction,
    )
    if report.ok:
        return Check("data verified", True, f"{shards}: verified now ({len(report.checks)} checks passed)")
    return Check("data verified", False, f"{shards}: " + "; ".join(f"{c.name}: {c.detail}" for c in report.failed))


# --------------------------------------------------------------------------------------------------------------
# All of them
# --------------------------------------------------------------------------------------------------------------


def gpu_names() -> list[str]:
    import torch

    if not torch.cuda.is_available():
        return []
    return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]


def run_preflight(config: str | Path | RunConfig, data_dir: Optional[str | Path] = None, verify_now: bool = True,
                  seed: Optional[int] = None) -> list[Check]:
    """``config``: a recipe file, or an already-validated RunConfig (what the Snakemake rule passes as JSON).
    ``seed``: the one seed a training job is about to run (the rule passes it; its recipe JSON leaves the seed
    list out, so that adding a seed retrains nothing); without it, the recipe's seed list is printed."""
    try:
        cfg = config if isinstance(config, RunConfig) else load_run_config(config)
    except ConfigError as exc:
        return [Check("config", False, str(exc))]
    if isinstance(config, RunConfig):
        config = "recipe"
    seeds = f"seed {seed}" if seed is not None else f"seeds {list(cfg.seeds)}"
    checks = [Check("config", True, f"{config}: run '{cfg.run}', mode {cfg.mode}, {seeds}")]

    for module, why in (
        ("torch", ""),
        ("numpy", ""),
        ("sentencepiece", "tokenizer"),
        ("brotli", "code wrapper and " "compression"),
        ("pandas", "report"),
        ("yaml", "recipes"),
    ):
        checks.append(import_check(module, why=why))
    torch_ok = next(c for c in checks if c.name == "import torch").ok
    names: list[str] = []
    if torch_ok:
        import torch

        names = gpu_names()
        checks.append(torch_version_check(torch.__version__))
        checks.append(
            Check(
                "CUDA",
                True,
                f"torch CUDA {torch.version.cuda}, {len(names)} visible GPU(s)"
                + (f": {', '.join(names)}" if names else ""),
                required=False,
            )
        )
        if names:
            checks.append(import_check("triton", why="torch.compile and the fused kernels on CUDA"))
        checks.append(
            import_check(
                "flash_attn_interface",
                required=False,
                why="optional FlashAttention-3; attention falls back to torch varlen / SDPA",
            )
        )
        checks.append(attention_check(cfg.model.attention_backend, "cuda" if names else "cpu"))
        checks.append(hardware_check(cfg.mode, names))
        checks.append(batch_split_check(cfg, max(len(names), 1)))
    checks.append(import_check("snakemake", required=False, why="the pipeline runner; stages also run without it"))
    checks.append(binary_check("torchrun", "the train rule launches one process per GPU with it"))
    if cfg.pack.compressor == "lrzip":
        checks.append(binary_check("lrzip", "pack.compressor is lrzip"))

    root, shards = data_paths(cfg, data_dir)
    data = data_check(cfg, root, shards, verify_now)
    checks.append(data)
    need = WORK_SPACE_BYTES + (0 if data.ok else data_size_bytes(cfg))
    checks.append(disk_check(root, need))
    return checks


def attention_check(requested: str, device: str) -> Check:
    """model.attention_backend resolved as the stages will resolve it: an explicit fa3/fa4 that cannot run here
    fails now, not after the data stage."""
    from pgolf.model.attention import resolve_backend

    try:
        choice = resolve_backend(requested, device)
    except (RuntimeError, ValueError) as exc:
        return Check("attention backend", False, str(exc))
    return Check("attention backend", True, f"{requested} -> {choice.resolved} on {device} ({choice.reason})")


def print_checks(checks: Sequence[Check], file=None) -> None:
    out = file or sys.stdout
    for c in checks:
        print(f"{c.status}  {c.name}: {c.detail}", file=out)
    failed = [c for c in checks if not c.ok and c.required]
    print("preflight: OK" if not failed else f"preflight: FAILED: {', '.join(c.name for c in failed)}", file=out)
