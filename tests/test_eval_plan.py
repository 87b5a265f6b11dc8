"""pgolf eval-plan: the LoRA-TTT step schedule equals the real run's, and the projection adds up as documented."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from eval_fixtures import copy_model, eval_config, random_docs, tiny_model, val_from_docs, write_val_dir
from pgolf.cli import main as pgolf_main
from pgolf.config import ConfigError
from pgolf.evaluate.plan import (EvalCosts, Segment, batch_slot_steps, lora_schedule, project,
                             synthetic_doc_lengths)
from pgolf.evaluate.ttt import run_ttt

ROOT = Path(__file__).resolve().parents[1]
RECORD_VAL_TOKENS = 47_851_520
SLOTS = dict(slot_lengths=(8, 16, 24))  # chunk 8 targets, context 24 (eval_config)


def costs(**changes) -> EvalCosts:
    base = dict(step_seconds={8: 1.0, 16: 2.0, 24: 3.0}, compile_seconds={8: 10.0, 16: 20.0, 24: 30.0},
                phase_tokens_per_s=10.0, load_seconds=5.0, measured_with={}, source="test costs",
                warm_compile_seconds=2.0)
    base.update(changes)
    return EvalCosts(**base)


def test_batch_steps_follow_the_longest_document_by_hand():
    cfg = eval_config("lora", **SLOTS).ttt
    # 20 targets: chunks end at 8, 16, 20 -> windows 8, 16, 20 -> slots 8, 16, 24
    assert batch_slot_steps(np.array([20, 5, 0]), cfg) == Counter({8: 1, 16: 1, 24: 1})
    # 40 targets: windows 8, 16, 24, 24 (context), 24
    assert batch_slot_steps(np.array([3, 40]), cfg) == Counter({8: 1, 16: 1, 24: 3})
    assert batch_slot_steps(np.array([0, 0]), cfg) == Counter()


def test_two_process_schedule_and_projection_by_hand():
    cfg = eval_config("lora", docs_per_batch=1, phase_boundaries_docs=(2,), **SLOTS).ttt
    lengths = np.array([11, 31, 6, 21])  # targets 10, 30, 5, 20 -> queue 30, 20, 10, 5
    schedule = lora_schedule(lengths, cfg, world_size=2)
    assert schedule.segments == (
        Segment((Counter({8: 1, 16: 1, 24: 2}), Counter({8: 1, 16: 1, 24: 1})), 50),  # phase on 30 + 20 targets
        Segment((Counter({8: 1, 16: 1}), Counter({8: 1})), 0),
    )
    assert schedule.slot_lengths_compiled == (8, 16, 24)
    cold = project(schedule, costs())
    # segment 1: ranks 1+2+6 = 9 and 1+2+3 = 6 s; phase 50 / 2 / 10 = 2.5 s; segment 2: 3 and 1 s
    assert cold["lora_score_s"] == 12.0 and cold["phase_s"] == 2.5 and cold["warmup_s"] == 60.0
    assert cold["total_s"] == 5.0 + 60.0 + 12.0 + 2.5
    assert cold["lora_idle_s_mean"] == 12.0 - (12.0 + 7.0) / 2
    assert cold["steps_by_slot_length_busiest_rank"] == {"8": 2, "16": 2, "24": 2}
    assert schedule.longest_batch_steps == Counter({8: 1, 16: 1, 24: 2}) and cold["longest_batch_s"] == 9.0
    assert project(schedule, costs(), "warm")["warmup_s"] == 2.0 * 3


def test_schedule_equals_a_real_run(tmp_path):
    """One process, phases, three slot lengths: the plan's steps per slot length and phase tokens are the run's."""
    docs = random_docs([5, 33, 18, 70, 0, 41, 9, 26, 12, 3, 50], seed=5)
    val = val_from_docs(docs)
    cfg = eval_config("lora", phase_boundaries_docs=(3, 6), **SLOTS)
    out = run_ttt(copy_model(tiny_model(seed=3)), val, cfg, 0, device=torch.device("cpu"))
    schedule = lora_schedule(val.doc_lengths(), cfg.ttt, world_size=1)
    ran = {int(L): v["steps"] for L, v in out.summary["slot_timing"].items()}
    assert ran == dict(schedule.steps_per_rank()[0]) and len(ran) == 3
    assert [p["tokens"] for p in out.summary["phases"]] == [s.phase_tokens for s in schedule.segments[:-1]]

    # the same run's eval.json prices a projection
    eval_json = tmp_path / "eval.json"
    eval_json.write_text(json.dumps({"ttt": out.summary, "timings": {"load_s": 1.5, "warmup_s": 6.0}}))
    priced = EvalCosts.from_eval_result(eval_json)
    for L, v in out.summary["slot_timing"].items():
        assert priced.step_seconds[int(L)] == pytest.approx(v["seconds"] / v["steps"])
    phases = out.summary["phases"]
    assert priced.phase_tokens_per_s == pytest.approx(sum(p["tokens"] for p in phases) / sum(p["seconds"] for p in phases))
    assert priced.load_seconds == 1.5 and priced.measured_with == {"docs_per_batch": 3}
    assert project(schedule, priced)["lora_score_s"] == pytest.approx(
        sum(v["seconds"] for v in out.summary["slot_timing"].values()), abs=0.2)


def test_missing_prices_and_bad_inputs_are_named(tmp_path):
    cfg = eval_config("lora", **SLOTS).ttt
    schedule = lora_schedule(np.array([40, 3]), cfg, 1)
    with pytest.raises(ConfigError, match=r"test costs: no step_seconds for slot length 24"):
        project(schedule, costs(step_seconds={8: 1.0, 16: 2.0}))
    with pytest.raises(ConfigError, match="no warm_compile_seconds"):
        project(schedule, costs(warm_compile_seconds=None), "warm")
    with pytest.raises(ValueError, match="world_size"):
        lora_schedule(np.array([4]), cfg, 0)
    bad = tmp_path / "costs.json"
    bad.write_text(json.dumps({"step_seconds": {"8": 1}, "compile_seconds": {}, "load_seconds": 1}))
    with pytest.raises(ConfigError, match=r"costs.json: missing field 'phase_tokens_per_s'"):
        EvalCosts.from_json(bad)
    no_lora = tmp_path / "eval.json"
    no_lora.write_text(json.dumps({"ttt": {"mode": "none"}, "timings": {}}))
    with pytest.raises(ConfigError, match="no ttt.slot_timing"):
        EvalCosts.from_eval_result(no_lora)


def test_synthetic_lengths_have_the_asked_mean():
    lengths = synthetic_doc_lengths(50_000, 957.0, seed=1)
    assert lengths.min() >= 2 and abs((lengths - 1).mean() / 957.0 - 1) < 0.02


def test_cli_projects_the_record_recipe_with_the_measured_costs(capsys):
    costs_file = ROOT / "benchmarks" / "eval_costs_h200_2026-12-01.json"
    code = pgolf_main(["eval-plan", "--config", str(ROOT / "config.yaml"), "--costs", str(costs_file),
                       "--docs", "3000", "--gpus", "8", "--slot-lengths", "512,2048", "--schedule", "legacy"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["slot_lengths_compiled"] == [512, 2048] and result["world_size"] == 8
    parts = result["load_s"] + result["warmup_s"] + result["lora_score_s"] + result["phase_s"]
    assert result["total_s"] == pytest.approx(parts, abs=0.11)
    assert result["warmup_s"] == pytest.approx(84.8 + 96.8, abs=0.1)
    assert result["margin_s"] == pytest.approx(600.0 - result["total_s"], abs=0.11) and result["notes"] == []
    assert result["phases"] == 3  # 512 documents a round (8 x 64): 833, 1666, 2500 end rounds 2, 4, 5 of 6

    # prices measured with activation recompute do not hold for the record (no recompute): the output says so
    h100 = ROOT / "benchmarks" / "eval_costs_h100_2026-11-23.json"
    assert pgolf_main(["eval-plan", "--config", str(ROOT / "config.yaml"), "--costs", str(h100), "--docs", "500",
                       "--schedule", "legacy"]) == 0
    notes = json.loads(capsys.readouterr().out)["notes"]
    assert len(notes) == 1 and "checkpoint_activations=True" in notes[0]


def test_cli_refuses_a_recipe_without_lora(tmp_path, capsys):
    recipe = (ROOT / "recipes" / "smoke.yaml").read_text().replace("    mode: lora\n", "    mode: none\n", 1)
    path = tmp_path / "none.yaml"
    path.write_text(recipe)
    costs_file = ROOT / "benchmarks" / "eval_costs_h100_2026-11-23.json"
    assert pgolf_main(["eval-plan", "--config", str(path), "--costs", str(costs_file)]) == 2
    assert "projects LoRA TTT only" in capsys.readouterr().err


def test_cli_plans_on_real_validation_shards(tmp_path, capsys):
    """--data-dir: the documents of the shards (cut across shard files) are the ones planned."""
    lengths = [300, 40, 0, 129, 75]
    docs = random_docs(lengths, seed=2)
    data_dir = write_val_dir(tmp_path / "shards", docs)
    costs_file = tmp_path / "costs.json"
    costs_file.write_text(json.dumps({"step_seconds": {"128": 0.5}, "compile_seconds": {"128": 7.0},
                                      "phase_tokens_per_s": 100.0, "load_seconds": 1.0}))
    assert pgolf_main(["eval-plan", "--config", str(ROOT / "recipes" / "smoke.yaml"), "--costs", str(costs_file),
                       "--data-dir", str(data_dir), "--gpus", "1"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["targets"] == sum(lengths) and "5 documents" in result["documents"]
    # smoke TTT: chunks of 48, one batch of 8 slots, context 128 -> one slot length; the 300-target document
    # takes ceil(300 / 48) = 7 steps; no phase (boundaries 16, 32 documents are never reached before the end)
    assert result["slot_lengths_compiled"] == [128] and result["steps_per_rank_max"] == 7
    assert result["total_s"] == pytest.approx(1.0 + 7.0 + 7 * 0.5)


# --------------------------------------------------------------------------------------- the record variant

TIMELINE = ROOT / "benchmarks" / "record_pr1855_timeline.json"
RECORD_COSTS = ROOT / "benchmarks" / "record_pr1855_costs.json"


def _plan(capsys, *argv) -> dict:
    assert pgolf_main(["eval-plan", "--config", str(ROOT / "config.yaml"), *argv]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("seed", ["42", "0", "1234"])
def test_replay_of_the_records_schedule_reproduces_its_logged_phase_pauses(capsys, seed):
    """The record's 8-rank schedule replayed on the rebuilt lengths with the prices fitted to its logs: every logged
    phase pause and resume within 10 %, the documents scored at each pause and the phase chunk counts exact."""
    logged = json.loads(TIMELINE.read_text())["seeds"][seed]
    result = _plan(capsys, "--costs", str(RECORD_COSTS), "--schedule", "record",
                   "--record-warmup-seconds", str(logged["warmup_s"]))
    assert result["pd"] == logged["pd"] and result["phase_chunks"] == logged["phase_chunks"]
    assert result["phase_prefixes"] == [21, 34, 47]
    for what in ("pauses", "resumes"):
        for ours, theirs in zip(result[what], logged[what], strict=True):
            assert abs(ours / theirs - 1) <= 0.10, (what, result[what], logged[what])
    assert abs(result["ttt_timer_s"] / logged["end"] - 1) <= 0.05


def test_the_shipped_timeline_is_what_the_logs_say():
    """benchmarks/record_pr1855_timeline.json against the logs themselves (when shared/reference is present)."""
    import re

    import record_oracle

    folder = record_oracle.record_script().parent
    if not (folder / "train_seed42.log").exists():
        pytest.skip(f"record logs not found in {folder}")
    for seed, logged in json.loads(TIMELINE.read_text())["seeds"].items():
        text = (folder / f"train_seed{seed}.log").read_text()
        pauses = re.findall(r"^ttpp: phase:\d/\d pd:(\d+) gd:(\d+) t:([\d.]+)s", text, re.M)
        assert [int(p) for p, _, _ in pauses] == logged["pd"] and [int(g) for _, g, _ in pauses] == logged["gd"]
        assert [float(t) for _, _, t in pauses] == logged["pauses"]
        assert [float(t) for t in re.findall(r"^ttpr: phase:\d/\d t:([\d.]+)s", text, re.M)] == logged["resumes"]
        chunks = sorted({int(n) for n in re.findall(r"^tttg: c\d+/(\d+) ", text, re.M)})
        assert chunks == logged["phase_chunks"]
        assert float(re.search(r"^total_eval_time:([\d.]+)s", text, re.M)[1]) == logged["end"]
        assert float(re.search(r"^ttt_lora:compile warmup done \(([\d.]+)s\)", text, re.M)[1]) == logged["warmup_s"]


def test_pgolf_schedule_projection_by_hand(tmp_path):
    """Record variant, 1 lane on 1 GPU: doc_len [3, 5, 9, 4, 6], 2 per batch, chunks of 2, context 4, a phase after
    2 documents. Queue: [9] (fresh: one document), [5, 6], [3, 4]; the phase fires after 2 entries and trains on
    the 5- and 6-token documents (11 tokens: 3 chunks of 4, 2 trained)."""
    from pgolf.evaluate.plan_record import RecordCosts, StepPrices, project_record_variant
    from pgolf.evaluate.ttt_plan import schedule_of

    doc_len = np.array([3, 5, 9, 4, 6])
    schedule = schedule_of(doc_len, per_batch=2, chunk=2, ctx=4, bounds=(2,))
    costs = RecordCosts(StepPrices(a=1.0, b=0.1, score_only_factor=0.5), phase_tokens_per_s=2.0,
                        phase_fixed_seconds=0.5, load_seconds=3.0, compile_seconds=7.0, warm_compile_seconds=1.0,
                        adapter_draw_seconds=0.5, source="hand")
    out = project_record_variant(schedule, doc_len, costs, 1, phase_chunk_tokens=4, phase_rows=1)
    # [9]: steps w 2, 4, 4 train (1.2, 1.4, 1.4) + score-only w 4 (1.2) = 5.2; [5, 6]: 1.4 + 1.8 + 1.2 = 4.4;
    # draws: the lane's set + the fresh batch's own = 1.0 -> segment 0 = 10.6; phase (3 - 1) x 4 / 2 + 0.5 = 4.5;
    # [3, 4]: 1.4 + 1.2 + the lane's new set 0.5 = 3.1
    assert [s["seconds"] for s in out["segments"]] == [10.6, 3.1] and out["phases"][0]["seconds"] == 4.5
    assert out["phases"][0]["tokens"] == 11 and out["phases"][0]["chunks"] == 3
    assert out["total_s"] == pytest.approx(3.0 + 7.0 + 10.6 + 4.5 + 3.1)


def test_cli_projects_pgolf_on_the_records_lengths(capsys, tmp_path):
    result = _plan(capsys, "--costs", str(RECORD_COSTS))
    assert result["schedule"] == "pgolf" and result["targets"] == RECORD_VAL_TOKENS
    assert result["phase_prefixes"] == [21, 34, 47] and result["side_batches"] == list(range(7))
    parts = result["load_s"] + result["warmup_s"] + result["score_s"]
    assert result["total_s"] == pytest.approx(parts, abs=0.11)
    record = _plan(capsys, "--costs", str(RECORD_COSTS), "--schedule", "record")
    assert result["total_s"] < record["total_s"]  # at the record's own prices, pgolf's schedule is shorter
    lengths = tmp_path / "lengths.json"
    lengths.write_text(json.dumps({"doc_len": [40, 7, 300, 12]}))
    small = _plan(capsys, "--costs", str(RECORD_COSTS), "--lengths", str(lengths), "--gpus", "1")
    assert small["targets"] == 355 and "4 documents" in small["documents"]
    bad = tmp_path / "bad.txt"
    bad.write_text("12\nabc\n")
    assert pgolf_main(["eval-plan", "--config", str(ROOT / "config.yaml"), "--costs", str(RECORD_COSTS),
                       "--lengths", str(bad)]) == 2
    assert "one document length per line" in capsys.readouterr().err
    binary = tmp_path / "lengths.bin"
    binary.write_bytes(b"12\n\xff\xfe\n")
    assert pgolf_main(["eval-plan", "--config", str(ROOT / "config.yaml"), "--costs", str(RECORD_COSTS),
                       "--lengths", str(binary)]) == 2
    assert f"{binary}: expected UTF-8 text" in capsys.readouterr().err


def test_negative_prices_are_refused(tmp_path, capsys):
    """A costs file whose prices are negative would promise a plan of negative seconds: refused, naming them."""
    prices = json.loads((ROOT / "benchmarks" / "record_pr1855_costs.json").read_text())
    prices["step"]["a"] = -prices["step"]["a"]
    prices["load_seconds"] = -4.1
    prices["recompile"]["warmup_seconds"] = -500.0
    bad = tmp_path / "negative.json"
    bad.write_text(json.dumps(prices))
    assert pgolf_main(["eval-plan", "--config", str(ROOT / "config.yaml"), "--costs", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}: prices are seconds (or tokens per second), expected finite numbers >= 0: step.a = -" in err
    assert "load_seconds = -4.1" in err and "recompile.warmup_seconds = -500.0" in err
    assert pgolf_main(["eval-plan", "--config", str(ROOT / "config.yaml"), "--costs",
                       str(ROOT / "benchmarks" / "record_pr1855_costs.json")]) == 0
