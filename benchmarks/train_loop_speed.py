"""pgolf's training loop timed on one GPU, beside the record script's loop from the same machine (issue 16).

``pgolf bench train`` times a training step with its rows pinned once; the record's figures
(``shared/reference/side_by_side.sh record`` -> ``anchor_profile.json``) come from its real loop, loader
included. This times pgolf's real loop the same way: ``pgolf train`` with the recipe's model, optim and train
sections as they are (its stream, warm-up, schedule and looping switch), except ``max_wallclock_seconds``
(``--seconds``, the record harness's ``W``), on the same shards. Figures, from the run's own outputs:

- ``ms_per_step_before_loop`` / ``_after_loop``: the training stage's means of every step's host time
  (``train_summary.json``), what the record's windows also are (host time over 10 steps after a sync);
- ``windows``: each logged window of ``metrics.jsonl`` (the loop synchronizes the GPU at its log steps), and
  their medians per loop state without step 1 and without the window in which looping turned on;
- with ``--record-profile``: the record's two windows and pgolf / record for each loop state.

    # one GPU, FlashAttention 4 installed for both sides; the record's run first, in the same lease:
    #   FA3_SHIM=fa4 W=150 WS=5 POST=90 OUT=/tmp/rec bash .ref/side_by_side.sh record
    python benchmarks/train_loop_speed.py --data /tmp/syn --seconds 150 --record-profile /tmp/rec/anchor_profile.json \\
        --out OUT.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from compile_cache import compile_cache_env  # noqa: E402
from pgolf_warmup import run_arguments, run_training  # noqa: E402

SUMMARY_FIELDS = ("ms_per_step_before_loop", "ms_per_step_after_loop", "steps", "loop_enabled_step",
                  "train_seconds", "peak_memory_gib", "peak_memory_reserved_gib", "warmup_peak_memory_reserved_gib",
                  "compile_warmup_seconds", "compile_warmup_by_loop_state", "attention_backend",
                  "data_stream", "micro_batch_order", "param_storage", "cuda_graphs")
LOOP_STATES = {"before_loop": False, "after_loop": True}


def log_windows(metrics_lines: list[str], train_batch_tokens: int) -> list[dict[str, Any]]:
    """Each logged training window: its last step, loop state, and ms per step (tokens of the window over its
    synchronized wall time). ``mixed`` marks step 1 (compile leftovers, its own window) and the window in which
    looping turned on (steps of both states)."""
    records = [json.loads(line) for line in metrics_lines if line.strip()]
    steps = [r for r in records if r.get("event") == "train_step"]
    windows, previous_looping = [], None
    for index, r in enumerate(steps):
        looping = bool(r["looping"])
        windows.append({"step": int(r["step"]), "looping": looping,
                        "ms_per_step": train_batch_tokens / float(r["tokens_per_s"]) * 1000.0,
                        "mixed": index == 0 or (previous_looping is not None and looping != previous_looping)})
        previous_looping = looping
    return windows


def window_medians(windows: list[dict[str, Any]]) -> dict[str, Optional[float]]:
    """Median ms per step of the clean windows of each loop state (None: no such window)."""
    out = {}
    for state, looping in LOOP_STATES.items():
        clean = [w["ms_per_step"] for w in windows if w["looping"] is looping and not w["mixed"]]
        out[state] = statistics.median(clean) if clean else None
    return out


def record_figures(profile: dict[str, Any]) -> dict[str, Optional[float]]:
    """The record script's ms per step before and after looping, from its anchor_profile.json's windows."""
    windows = profile.get("windows") or {}
    return {"before_loop": (windows.get("pre_loop") or {}).get("ms_per_step"),
            "after_loop": (windows.get("post_loop") or {}).get("ms_per_step"),
            "peak_memory_gib": profile.get("peak_memory_allocated_gib"), "device": profile.get("device")}


def loop_speed(summary: dict[str, Any], metrics_lines: list[str], train_batch_tokens: int,
               record_profile: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """The figures of one timed run (and, with the record's profile, the ratios)."""
    result: dict[str, Any] = {key: summary.get(key) for key in SUMMARY_FIELDS}
    windows = log_windows(metrics_lines, train_batch_tokens)
    result["windows"] = windows
    result["window_median_ms_per_step"] = window_medians(windows)
    if record_profile is not None:
        record = record_figures(record_profile)
        result["record"] = record
        result["pgolf_over_record"] = {
            state: (result[f"ms_per_step_{state}"] / record[state]
                    if result[f"ms_per_step_{state}"] and record[state] else None)
            for state in LOOP_STATES
        }
    return result


def _fmt(x: Optional[float], spec: str = ",.1f") -> str:
    return "-" if x is None else format(x, spec)


def summary_line(result: dict[str, Any]) -> str:
    medians, attention = result["window_median_ms_per_step"], result["attention_backend"]
    if isinstance(attention, dict):  # the training stage's record of the choice: requested, resolved, reason
        attention = attention.get("resolved")
    text = (f"train_loop_speed: {result['steps']} steps in {result['train_seconds']:.0f} s, "
            f"{_fmt(result['ms_per_step_before_loop'])} / {_fmt(result['ms_per_step_after_loop'])} ms/step before / "
            f"after looping (windows {_fmt(medians['before_loop'])} / {_fmt(medians['after_loop'])}), "
            f"peak {_fmt(result['peak_memory_gib'])} GiB allocated, "
            f"{_fmt(result['peak_memory_reserved_gib'])} reserved (warm-up "
            f"{_fmt(result['warmup_peak_memory_reserved_gib'])}), attention {attention}")
    if "record" in result:
        record, ratio = result["record"], result["pgolf_over_record"]
        text += (f"; record {_fmt(record['before_loop'])} / {_fmt(record['after_loop'])} ms/step, pgolf / record "
                 f"{_fmt(ratio['before_loop'], '.3f')} / {_fmt(ratio['after_loop'], '.3f')}")
    return text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    run_arguments(parser, "inherit", "inherit (default): the environment's caches (the warm-up is not what is "
                                     "timed here); cold: empty ones")
    parser.add_argument("--seconds", type=float, default=150.0, help="the run's max_wallclock_seconds (default 150)")
    parser.add_argument("--record-profile", type=Path, default=None,
                        help="the record's anchor_profile.json from the same machine (side_by_side.sh record)")
    args = parser.parse_args(argv)
    if args.seconds <= 0:
        parser.error(f"--seconds: expected > 0, got {args.seconds}")
    record_profile = json.loads(args.record_profile.read_text()) if args.record_profile else None
    cache_env = compile_cache_env(args.compile_cache, "pgolf_loop_speed_cache_")
    from synthetic_shards import ensure_harness_shards

    from pgolf.config import load_run_config, to_dict

    cfg = load_run_config(args.config)
    ensure_harness_shards(args.data, cfg.model.vocab_size)
    train = {**to_dict(cfg.train), "max_wallclock_seconds": args.seconds}
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "train"
        summary = run_training(cfg, train, args.data, run_dir, args.device, cache_env)
        metrics_lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    result = loop_speed(summary, metrics_lines, cfg.train.train_batch_tokens, record_profile)
    result.update(config=str(args.config), seconds=args.seconds, data=str(args.data), compile_cache=args.compile_cache)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(summary_line(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
