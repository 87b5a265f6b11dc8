"""The record run: one seed's whole pipeline in ONE torchrun process group, in process.

    torchrun --standalone --nproc_per_node 8 train_gpt.py --seed 42 --data-dir ./data/     (bundled, see pgolf.artifact.bundle)
    torchrun --standalone --nproc_per_node 8 -m pgolf.artifact.record_run --config config.yaml --code-file train_gpt.py ...

A records folder ships one ``train_gpt.py`` that must train AND produce the scored artifact, so the staged
pipeline's five stages run here back to back, by calling the very functions the stage commands call (nothing is
re-implemented, so the outputs cannot drift apart):

  train     :func:`pgolf.train.loop.train_in_group`        every rank (the process group stays open)
  hessians  :func:`pgolf.quantize.hessians.run_hessian_stage`   rank 0; the record-mode training-budget check included
  quantize  :func:`pgolf.quantize.stage.quantize_checkpoint` rank 0, on ``quantize_device`` (CPU by default, as staged)
  pack      :func:`pgolf.artifact.pack.pack_quantized`   rank 0; size gate over ``code_file`` + compressed model
  evaluate  :func:`pgolf.evaluate.stage.run_evaluation`     every rank; it closes the process group when done

Each stage reads what the previous one wrote, under the same names as the staged pipeline's per-seed folder
(``train/``, ``hessians/``, ``quantize/``, ``pack/``, ``eval/``; see :class:`StagePaths`), except that the quantized
model goes from the quantize to the pack stage in memory (the staged ``run_quantize_stage`` and ``run_pack_stage``
are those two functions around a ``quantized.pt``, which the record run does not write: the artifact holds the
same tensors). So for the same checkpoint the quantize report and the artifact are exactly the staged ones, and
pgolf.report.results reads a record run's folder like a staged one. Rank 0 also writes ``logs/record_run.log`` (everything printed on rank 0, with a
line per stage) and ``record_run.json`` (stage timings and statuses, the headline numbers).

A stage that refuses (training + Hessians over the wallclock cap in record mode, artifact over the size cap)
stops the run with that stage's status (3); a stage that raises on rank 0 stops every rank, with rank 0's error.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional, TextIO

from pgolf.config import ConfigError, RunConfig, load_run_config, parse_run_config, to_dict
from pgolf.io import atomic_write_json, set_cpu_threads, sha256_json
from pgolf.artifact.minify import TAG_MESSAGES_FILE

STAGES = ("train", "hessians", "quantize", "pack", "evaluate")
DEFAULT_DATA_DIR = "./data/"
DESCRIPTION = (
    "pgolf record run: train, collect Hessians, quantize, pack and evaluate one seed in one torchrun process group "
    "(run one process per GPU with torchrun)."
)
EXIT_FAILED = 1


class StageFailed(RuntimeError):
    """A stage raised on rank 0; the other ranks raise this instead of waiting forever."""


@dataclasses.dataclass(frozen=True)
class StagePaths:
    """Where each stage writes, relative to one seed's folder (the layout of the staged pipeline)."""

    root: Path

    @property
    def train_dir(self) -> Path:
        return self.root / "train"

    @property
    def checkpoint(self) -> Path:
        return self.train_dir / "checkpoint"

    @property
    def hessians(self) -> Path:
        return self.root / "hessians" / "hessians.pt"

    @property
    def hessian_report(self) -> Path:
        return self.root / "hessians" / "hessian_report.json"

    @property
    def quantize_report(self) -> Path:
        return self.root / "quantize" / "quantize_report.json"

    @property
    def artifact(self) -> Path:
        return self.root / "pack" / "artifact.pgolf"

    @property
    def pack_report(self) -> Path:
        return self.root / "pack" / "pack_report.json"

    @property
    def eval_result(self) -> Path:
        return self.root / "eval" / "eval.json"

    @property
    def log(self) -> Path:
        return self.root / "logs" / "record_run.log"

    @property
    def results(self) -> tuple[Path, ...]:
        """The files a reader of the folder trusts (pgolf.report.results): removed when a run starts, so that a run
        that fails leaves none of an earlier run's beside its own. The checkpoint folder is replaced whole by the
        training stage."""
        return (self.summary, self.train_dir / "train_summary.json", self.hessians, self.hessian_report,
                self.quantize_report, self.artifact, self.pack_report, self.eval_result)

    @property
    def summary(self) -> Path:
        return self.root / "record_run.json"


# --------------------------------------------------------------------------------------------------------------
# Logging: everything rank 0 prints also goes to the log file
# --------------------------------------------------------------------------------------------------------------


class _Tee:
    """A text stream that writes to the original stream and to the log file."""

    def __init__(self, stream: TextIO, log: TextIO):
        self.stream, self.log = stream, log

    def write(self, text: str) -> int:
        self.log.write(text)
        return self.stream.write(text)

    def flush(self) -> None:
        self.log.flush()
        self.stream.flush()

    def __getattr__(self, name: str) -> Any:  # isatty, fileno, encoding, ... of the real stream
        return getattr(self.stream, name)


class RunLog:
    """Rank 0: tee stdout/stderr into ``path`` (appending) and write one ``[record_run]`` line per event.

    Other ranks pass ``path=None`` and log nothing (their output still reaches torchrun's console).
    """

    def __init__(self, path: Optional[Path]):
        self.path = path
        self.handle: Optional[TextIO] = None
        self.saved: Optional[tuple[TextIO, TextIO]] = None
        self.start = time.perf_counter()

    def __enter__(self) -> "RunLog":
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.handle = open(self.path, "a", encoding="utf-8", buffering=1)
            self.saved = (sys.stdout, sys.stderr)
            sys.stdout, sys.stderr = _Tee(sys.stdout, self.handle), _Tee(sys.stderr, self.handle)
        return self

    def __exit__(self, *exc_info: Any) -> None:
        if self.saved is not None:
            sys.stdout.flush()
            sys.stderr.flush()
            sys.stdout, sys.stderr = self.saved
        if self.handle is not None:
            self.handle.close()

    def event(self, message: str) -> None:
        if self.path is not None:
            print(f"[record_run {time.perf_counter() - self.start:8.1f}s] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------------------
# Running a step on rank 0 without leaving the other ranks hanging
# --------------------------------------------------------------------------------------------------------------


def _broadcast_status(status: int, info) -> int:
    from pgolf.train.distributed import broadcast_float

    return int(broadcast_float(float(status), info))


def on_rank0(info, stage: str, work: Callable[[], int]) -> int:
    """Run ``work`` (returning an exit status) on rank 0 only and give its status to every rank.

    If it raises on rank 0, the other ranks learn it through the broadcast status and raise :class:`StageFailed`
    rather than waiting at the next collective until the group times out.
    """
    status = 0
    error: Optional[BaseException] = None
    if info.is_main:
        try:
            status = int(work())
        except BaseException as exc:  # re-raised below, after the other ranks were told
            error, status = exc, EXIT_FAILED
    status = _broadcast_status(status, info)
    if error is not None:
        raise error
    if status == EXIT_FAILED and not info.is_main:
        raise StageFailed(f"stage {stage} failed on rank 0 (see its log)")
    return status


def _barrier(info) -> None:
    if info.enabled:
        import torch.distributed as dist

        dist.barrier()


def code_identity(cfg: RunConfig) -> str:
    """The code identity this run's reports record beside its code bytes: inside a bundled train_gpt.py its
    CODE_HASH; from the installed package, the CODE_HASH the recipe's bundle has (the same value the staged
    pipeline's gate rule records)."""
    import pgolf

    bundle = getattr(pgolf, "__bundle__", None)
    if isinstance(bundle, dict) and isinstance(bundle.get("code_hash"), str):
        return bundle["code_hash"]
    from pgolf.artifact.bundle import code_identity as recipe_code_identity, shipped_recipe  # never bundled

    return recipe_code_identity(shipped_recipe(cfg))


def default_tokenizer(data_dir: Path) -> Optional[Path]:
    """A tokenizer beside the shards (needed only for lookup-table byte accounting), as ``pgolf eval`` looks."""
    return next((p for p in (data_dir / "tokenizer.model", data_dir.parent / "tokenizer.model") if p.exists()), None)


# --------------------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------------------


def run_record(
    cfg: RunConfig,
    seed: int,
    data_dir: str | Path,
    out_dir: str | Path,
    tokenizer_path: str | Path | None = None,
    *,
    code_file: str | Path | None = None,
    device_kind: str = "auto",
    quantize_device: str = "cpu",
    stop_after: str = "evaluate",
) -> dict[str, Any]:
    """Run the stages of one seed up to ``stop_after`` in this process group; returns the summary (rank 0's is
    complete) with ``exit_status`` 0, or the status of the stage that refused.

    ``code_file``: the counted code of the size gate (a bundled train_gpt.py passes itself); required when the
    run reaches the pack stage. ``tokenizer_path``: only for lookup-table byte accounting (default: a
    ``tokenizer.model`` beside the shards).
    """
    from pgolf.train.distributed import init_distributed, shutdown

    if stop_after not in STAGES:
        raise ConfigError(f"stop_after: expected one of {', '.join(STAGES)}, got {stop_after!r}")
    if seed < 0:
        raise ConfigError(f"seed: expected >= 0, got {seed}")
    if quantize_device == "cuda" and device_kind == "cpu":
        raise ConfigError("--quantize-device cuda with --device cpu: a CPU run has no GPU to quantize on")
    last = STAGES.index(stop_after)
    data_dir, paths = Path(data_dir), StagePaths(Path(out_dir))
    if last >= STAGES.index("pack"):
        if code_file is None:
            raise ConfigError("code_file: the pack stage counts a code file (train_gpt.py) against the size cap; none given")
        if not Path(code_file).is_file():
            raise FileNotFoundError(f"{code_file}: code file not found")
    if not data_dir.is_dir():
        raise FileNotFoundError(f"{data_dir}: data directory not found (pass --data-dir, the folder of the .bin shards)")
    tokenizer = Path(tokenizer_path) if tokenizer_path else default_tokenizer(data_dir)
    if last == STAGES.index("evaluate"):  # what the evaluation will refuse, refused before the training budget goes
        from pgolf.evaluate.valdata import planned_accounting

        planned_accounting(data_dir, cfg.evaluate.byte_accounting, tokenizer, cfg.tokenizer.caseops)

    info = init_distributed(device_kind)
    process_threads = set_cpu_threads(0)  # torch's CPU threads of this process, before any stage sets its own
    summary: dict[str, Any] = {
        "run": cfg.run, "mode": cfg.mode, "seed": seed, "world_size": info.world_size, "data_dir": str(data_dir),
        "out_dir": str(paths.root), "code_file": None if code_file is None else str(code_file),
        "code_hash": code_identity(cfg), "config_sha256": sha256_json(to_dict(cfg)), "stop_after": stop_after,
        "stages": {}, "exit_status": 0,
    }
    if info.is_main:
        for path in paths.results:
            path.unlink(missing_ok=True)
    with RunLog(paths.log if info.is_main else None) as log:
        log.event(f"run {cfg.run!r} ({cfg.mode}) seed {seed}: {info.world_size} process(es) on {info.device}, "
                  f"data {data_dir}, output {paths.root}, code hash {summary['code_hash'][:16]}")

        def stage(name: str, work: Callable[[], int], everywhere: bool = False) -> bool:
            """Run one stage; record its time and status; False stops the run."""
            log.event(f"{name}: start")
            set_cpu_threads(process_threads)  # each stage starts as its own process would (it sets its own)
            t0 = time.perf_counter()
            if everywhere:
                status = int(work())
            else:
                status = on_rank0(info, name, work)
            seconds = time.perf_counter() - t0
            summary["stages"][name] = {"status": status, "seconds": seconds}
            log.event(f"{name}: {'done' if status == 0 else f'REFUSED (exit status {status})'} in {seconds:.1f} s")
            if status:
                summary["exit_status"] = status
            return status == 0 and STAGES.index(name) < last

        def train() -> int:
            from pgolf.train.loop import train_in_group

            result = train_in_group(cfg.model, cfg.optim, cfg.train, seed, data_dir, paths.train_dir, info)
            _barrier(info)  # rank 0's checkpoint is complete before anyone reads it
            summary["train"] = {k: result.get(k) for k in ("steps", "train_seconds", "ms_per_step", "tokens_per_s")}
            return 0

        def hessians() -> int:
            from pgolf.quantize.hessians import run_hessian_stage

            report, status = run_hessian_stage(paths.checkpoint, data_dir, cfg.hessians, seed, paths.hessians,
                                               paths.hessian_report, cfg.mode, device_kind)
            summary["hessians"] = {k: report.get(k) for k in ("hessian_seconds", "train_plus_hessian_seconds", "message")}
            return status

        quantized = {}  # the quantize stage's outcome, handed to the pack stage in memory (rank 0 runs both)

        def quantize() -> int:
            from pgolf.quantize.stage import quantize_checkpoint, write_quantize_report

            quantized["done"] = done = quantize_checkpoint(paths.checkpoint, paths.hessians, cfg.quantize,
                                                           quantize_device)
            write_quantize_report(paths.quantize_report, done.report)
            summary["quantize"] = {"seconds": done.report["quantize_seconds"]}
            return 0

        def pack() -> int:
            from pgolf.artifact.pack import pack_quantized

            done = quantized["done"]
            report, status = pack_quantized(done.model, done.provenance, "the quantize stage", paths.checkpoint,
                                            cfg.pack, code_file, paths.artifact, paths.pack_report,
                                            code_id=summary["code_hash"])
            summary["pack"] = {k: report.get(k) for k in ("artifact_sha256", "model_bytes", "code_bytes",
                                                          "code_bytes_convention", "code_sha256", "total_bytes", "cap",
                                                          "message")}
            return status

        def evaluate() -> int:
            from pgolf.evaluate.stage import run_evaluation

            # run_evaluation joins the open group (init_distributed sees it) and closes it when done
            report, status = run_evaluation(paths.artifact, cfg.evaluate, seed, data_dir, paths.eval_result,
                                            checkpoint=paths.checkpoint, tokenizer=tokenizer, mode=cfg.mode,
                                            device_kind=device_kind)
            summary["evaluate"] = {k: report.get(k) for k in ("val_bpb", "val_loss", "token_count", "byte_sum")}
            summary["evaluate"]["total_s"] = report.get("timings", {}).get("total_s")
            return status

        steps = {"train": train, "hessians": hessians, "quantize": quantize, "pack": pack, "evaluate": evaluate}
        try:
            for name in STAGES:
                if not stage(name, steps[name], everywhere=name in ("train", "evaluate")):
                    break
        except BaseException as exc:  # the summary and the log say how the run ended, an error included
            summary["exit_status"] = summary["exit_status"] or EXIT_FAILED
            summary["error"] = f"{type(exc).__name__}: {exc}"
            log.event(f"failed: {summary['error']}")
            raise
        finally:
            if info.is_main:
                atomic_write_json(paths.summary, summary)
                log.event(f"finished with exit status {summary['exit_status']}; summary {paths.summary}")
    shutdown(info)  # a no-op when evaluation already closed the group
    return summary


# --------------------------------------------------------------------------------------------------------------
# Command line (the bundled train_gpt.py calls main with its embedded config and its own path)
# --------------------------------------------------------------------------------------------------------------


def build_parser(bundled: bool, default_seed: Optional[int] = None) -> argparse.ArgumentParser:
    """The options of ``train_gpt.py`` (``bundled``) or of ``python -m pgolf.artifact.record_run`` (which adds
    ``--config`` and ``--code-file``: :func:`cli_main`).

    No path or environment-dependent text appears in ``--help``, so a bundle and its wrapper form print the same.
    """
    prog = "train_gpt.py" if bundled else "python -m pgolf.artifact.record_run"
    parser = argparse.ArgumentParser(prog=prog, description=DESCRIPTION)
    seed_help = "training seed" + (f" (default: {default_seed}, the recipe's first)" if default_seed is not None else
                                   " (default: the recipe's first)")
    parser.add_argument("--seed", type=int, help=seed_help)
    parser.add_argument("--data-dir", default=DEFAULT_DATA_DIR,
                        help=f"folder of the fineweb_{{train,val}}_*.bin shards (default: {DEFAULT_DATA_DIR})")
    parser.add_argument("--out-dir", help="output folder (default: ./results/seed<seed>)")
    parser.add_argument("--tokenizer", help="SentencePiece model, for lookup-table byte accounting only "
                                            "(default: tokenizer.model beside the shards, if any)")
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    parser.add_argument("--quantize-device", choices=["cpu", "cuda", "auto"], default="cpu",
                        help="where GPTQ runs (default cpu: the staged pipeline's default, so results match it)")
    parser.add_argument("--stop-after", choices=STAGES, default="evaluate", help="last stage to run (default: evaluate)")
    return parser


def cli_main(argv: list[str] | None = None, *, run_config: Optional[dict] = None,
             code_file: str | Path | None = None) -> int:
    """Entry point of ``python -m pgolf.artifact.record_run``: ``--config`` and ``--code-file`` are required. With
    ``run_config`` it is :func:`bundle_main` (what a bundled train_gpt.py calls). (Not named ``main``: shaking
    keeps every definition whose name any bundled code spells, strings included, and "main" is a Hub revision.)"""
    if run_config is not None:
        return bundle_main(run_config, code_file, argv)
    parser = build_parser(False)
    parser.add_argument("--config", required=True, help="recipe YAML")
    parser.add_argument("--code-file", required=True, help="the counted code of the size gate (train_gpt.py)")
    args = parser.parse_args(argv)
    return _run_parsed(lambda: load_run_config(args.config), args, args.code_file, parser.prog)


def bundle_main(run_config: dict, code_file: str | Path | None, argv: list[str] | None = None) -> int:
    """Entry point of a bundled train_gpt.py: ``run_config`` is the embedded recipe (plain JSON data),
    ``code_file`` the bundle's own path. (Its own function, so that the bundle ships no YAML loading.)"""
    cfg = parse_run_config(run_config, "train_gpt.py: CONFIG_JSON")
    parser = build_parser(True, cfg.seeds[0])
    return _run_parsed(lambda: cfg, parser.parse_args(argv), code_file, parser.prog)


def _run_parsed(recipe: Callable[[], RunConfig], args: argparse.Namespace, code_file, prog: str) -> int:
    """Run the record for parsed arguments; a refusal of the arguments or the data is one line, exit status 2."""
    try:
        cfg = recipe()
        seed = cfg.seeds[0] if args.seed is None else args.seed
        out_dir = Path(args.out_dir) if args.out_dir else Path("results") / f"seed{seed}"
        summary = run_record(cfg, seed, args.data_dir, out_dir, args.tokenizer, code_file=code_file,
                             device_kind=args.device, quantize_device=args.quantize_device, stop_after=args.stop_after)
    except (ConfigError, ValueError, OSError) as exc:  # OSError: a file where --out-dir expects a folder, say
        message = str(exc)
        if " " not in message and message.rpartition(":")[2].isdigit():  # a shipped form's tag, e.g. data.loader:70
            message += f" (the text of this tag: {TAG_MESSAGES_FILE} beside the script)"
        print(f"{prog}: error: {message}", file=sys.stderr)
        return 2
    return int(summary["exit_status"])


if __name__ == "__main__":
    sys.exit(cli_main())
