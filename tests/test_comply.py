"""pgolf comply: the rules of rules.md on a run's own records.

The data evidence (verified.json) is produced by the real verifier (pgolf.data.verify.verify_dir) over real shard
files written with the shard writer; the per-seed files follow the stage contracts (tests/report_fixtures.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from report_fixtures import RECORD_BPB, make_run

from pgolf.compliance import comply
from pgolf.cli import main as cli_main
from pgolf.config import parse_run_config, to_dict
from pgolf.data.shards import BOS_ID, ShardStreamWriter
from pgolf.data.verify import verify_dir

DATA_NAME = "fx_data"
N_VAL = 50_000


def _docs(n_docs: int, offset: int) -> list[np.ndarray]:
    """``n_docs`` distinct 3-token documents [BOS, a, b] (pairs numbered from ``offset``; ids >= 8)."""
    index = np.arange(offset, offset + n_docs)
    docs = np.stack([np.full(n_docs, BOS_ID), 8 + index // 4000, 8 + index % 4000], axis=1).astype(np.uint16)
    return list(docs)


def _write_stream(directory: Path, kind: str, docs: list[np.ndarray]) -> None:
    with ShardStreamWriter(directory, kind, 60_000) as writer:
        for doc in docs:
            writer.append(doc)


def make_data(results: Path, leak: int = 0) -> Path:
    """results/data/<name>/{shards/, verified.json}: 50,000 val docs, 2,000 train docs; ``leak`` puts that many val
    docs (17, 18, ...) into the training split (above 500, 1% of them, the #2127 failure; a few: an export's own
    exact duplicates, accepted as published)."""
    data_dir = results / "data" / DATA_NAME
    shards = data_dir / "shards"
    shards.mkdir(parents=True)
    val = _docs(N_VAL, 0)
    train = _docs(2_000, N_VAL)
    for i in range(leak):
        train.insert(500 + i, val[17 + i].copy())
    _write_stream(shards, "val", val)
    _write_stream(shards, "train", train)
    report = verify_dir(shards, expected_val_docs=N_VAL, record=True)
    (data_dir / "verified.json").write_text(json.dumps(report.to_dict()))
    return data_dir


def _edit(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def make_compliant_run(tmp_path: Path) -> Path:
    """A 3-seed record run on 8xH100 with gate reports, eval ledgers and the data it trained on."""
    run_dir = make_run(tmp_path)
    for seed in RECORD_BPB:
        base = run_dir / f"seed{seed}"
        pack = json.loads((base / "pack" / "pack_report.json").read_text())
        gate = {k: pack[k] for k in ("artifact_sha256", "model_bytes", "code_bytes", "code_bytes_convention",
                                     "total_bytes", "cap", "code_sha256")}
        (base / "gate").mkdir()
        (base / "gate" / "gate_report.json").write_text(json.dumps({"stage": "gate", **gate, "ok": True}))

        def add_ledger(ev: dict) -> None:
            ev["ledger"] = {"positions": ev["token_count"] + 50_000, "scored_here": ev["token_count"] // 8,
                            "score_calls": 900, "updates": 12_000, "update_positions_total": 40_000_000,
                            "positions_used_by_updates": 40_000_000, "max_update_last_position": 1,
                            "complete_checked": True, "targets_expected": ev["token_count"], "complete": True}
            ev["evaluate_config"] = {"max_docs": 0, "ttt": {"mode": "lora", "debug_update_before_score": False}}
            ev["world_size"] = 8
            ev["environment"] = {"gpu": "NVIDIA H100 80GB HBM3"}

        _edit(base / "eval" / "eval.json", add_ledger)
        # a Hub export has no pgolf manifest, so training recorded none
        _edit(base / "train" / "checkpoint" / "checkpoint.json", lambda c: c.update(data_manifest_sha256=None))
    make_data(run_dir.parent)
    return run_dir


def record_config(**overrides):
    data = {"run": "record", "seeds": list(RECORD_BPB), "data": {"name": DATA_NAME}, **overrides}
    return parse_run_config(data, "test")


def verdicts_by_rule(run_dir: Path, cfg) -> dict[str, comply.Verdict]:
    return {v.rule: v for v in comply.check_run(run_dir, cfg)}


@pytest.fixture(scope="module")
def compliant(tmp_path_factory) -> Path:
    return make_compliant_run(tmp_path_factory.mktemp("compliant"))


def test_compliant_run_passes_every_rule(compliant, tmp_path, capsys):
    cfg = record_config()
    verdicts = verdicts_by_rule(compliant, cfg)
    assert set(verdicts) == {c.__name__.removeprefix("check_") for c in comply.CHECKS}
    assert {rule: v.status for rule, v in verdicts.items() if v.status != comply.PASS} == {}
    assert "50,000" in verdicts["val_docs"].evidence
    assert "'wrapper'" in verdicts["size"].evidence

    out = tmp_path / "comply.json"
    code = cli_main(["comply", str(compliant), "--config-json", json.dumps(to_dict(cfg)), "--json-out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    assert printed.count("PASS") == len(comply.CHECKS) and "record: COMPLIANT" in printed
    report = json.loads(out.read_text())
    assert report["compliant"] is True and report["failed_rules"] == []
    assert report["counts"] == {"PASS": len(comply.CHECKS), "FAIL": 0, "NOT-APPLICABLE": 0}


def test_leaky_data_is_rejected_naming_the_rule(tmp_path, capsys):
    run_dir = make_compliant_run(tmp_path)
    data_dir = run_dir.parent / "data" / DATA_NAME
    # rebuild the data with validation document 17 inside the training split, verified by the real verifier
    import shutil

    shutil.rmtree(data_dir)
    make_data(run_dir.parent, leak=501)
    verdicts = verdicts_by_rule(run_dir, record_config())
    assert verdicts["disjoint"].status == comply.FAIL
    assert "leak: 501 validation documents" in verdicts["disjoint"].evidence
    assert [r for r, v in verdicts.items() if v.status == comply.FAIL] == ["disjoint"]

    cfg_json = json.dumps(to_dict(record_config()))
    assert cli_main(["comply", str(run_dir), "--config-json", cfg_json]) == 1
    assert "NOT COMPLIANT: disjoint" in capsys.readouterr().out


def test_export_duplicates_are_accepted_and_shown(tmp_path):
    """A published export keeping 3 exact duplicates of validation documents in its training split passes, and the
    verdict shows the count."""
    import shutil

    run_dir = make_compliant_run(tmp_path)
    shutil.rmtree(run_dir.parent / "data" / DATA_NAME)
    make_data(run_dir.parent, leak=3)
    verdict = verdicts_by_rule(run_dir, record_config())["disjoint"]
    assert verdict.status == comply.PASS, verdict.evidence
    assert verdict.evidence.startswith("overlap 3 docs (verified.json (no pgolf manifest)), accepted as published:")


def test_an_overlap_a_loosened_verifier_passed_is_still_rejected(tmp_path):
    """Data verified with a raised data.max_val_overlap_fraction (a sweep's setting) says ok; comply holds the
    record to the default share: 501 of 50,000 validation documents with a training copy is a wrong split."""
    import shutil

    run_dir = make_compliant_run(tmp_path)
    shutil.rmtree(run_dir.parent / "data" / DATA_NAME)
    make_data(run_dir.parent, leak=501)
    verified = run_dir.parent / "data" / DATA_NAME / "verified.json"
    assert json.loads(verified.read_text())["summary"]["train_val_overlap_docs"] == 501

    def loosened(report):
        for check in report["checks"]:
            if check["name"] == "train/val disjoint":
                check["ok"] = True

    _edit(verified, loosened)
    verdict = verdicts_by_rule(run_dir, record_config())["disjoint"]
    assert verdict.status == comply.FAIL
    assert "501 validation documents have a copy in training, more than the 500" in verdict.evidence


def test_a_smeargate_without_its_bos_mask_is_rejected(compliant, tmp_path):
    import shutil

    shutil.copytree(compliant.parent, tmp_path / "results")
    run_dir = tmp_path / "results" / "record"
    assert verdicts_by_rule(run_dir, record_config())["doc_isolation"].status == comply.PASS
    _edit(run_dir / "seed0" / "eval" / "eval.json",
          lambda e: e["model_config"].update(smear_gate=True, smear_bos_mask=False))
    verdict = verdicts_by_rule(run_dir, record_config())["doc_isolation"]
    assert verdict.status == comply.FAIL and "seed0: the scored model's SmearGate has smear_bos_mask false" in verdict.evidence
    _edit(run_dir / "seed0" / "eval" / "eval.json", lambda e: e.pop("model_config"))
    assert "seed0/eval/eval.json: no model_config" in verdicts_by_rule(run_dir, record_config())["doc_isolation"].evidence


def test_manifest_overlap_and_foreign_manifest_are_rejected(compliant, tmp_path):
    import shutil

    run_dir = tmp_path / "results" / "record"
    shutil.copytree(compliant.parent, tmp_path / "results")
    manifest = run_dir.parent / "data" / DATA_NAME / "shards" / "manifest.json"
    manifest.write_text(json.dumps({"fingerprints": {"train_val_overlap_docs": 3},
                                    "bos": {"train": 2000, "val": N_VAL}, "docs": {"train": 2000, "val": N_VAL}}))
    _edit(run_dir / "seed0" / "train" / "checkpoint" / "checkpoint.json",
          lambda c: c.update(data_manifest_sha256="e" * 64))
    evidence = verdicts_by_rule(run_dir, record_config())["disjoint"]
    assert evidence.status == comply.FAIL
    assert "train_val_overlap_docs = 3" in evidence.evidence and "seed0: trained on data" in evidence.evidence


@pytest.mark.parametrize(
    "change, expected",
    [
        (lambda ev: ev["ledger"].update(complete=False), "ledger complete=False"),
        (lambda ev: ev["evaluate_config"]["ttt"].update(debug_update_before_score=True), "update before score"),
        (lambda ev: ev["ledger"].update(targets_expected=ev["token_count"] + 1), "ledger expected"),
        (lambda ev: ev.pop("ledger"), "no ledger summary"),
    ],
)
def test_ledger_violation_is_rejected(compliant, tmp_path, change, expected):
    import shutil

    shutil.copytree(compliant.parent, tmp_path / "results")
    run_dir = tmp_path / "results" / "record"
    _edit(run_dir / "seed1234" / "eval" / "eval.json", change)
    verdicts = verdicts_by_rule(run_dir, record_config())
    assert verdicts["ttt_ledger"].status == comply.FAIL
    assert expected in verdicts["ttt_ledger"].evidence and "seed1234" in verdicts["ttt_ledger"].evidence
    assert comply.is_compliant(list(verdicts.values())) is False


def test_sweep_mode_is_flagged_and_report_only_exits_zero(compliant, tmp_path, capsys):
    cfg = record_config(mode="sweep")
    verdicts = verdicts_by_rule(compliant, cfg)
    assert verdicts["mode"].status == comply.FAIL and "'sweep'" in verdicts["mode"].evidence
    cfg_json = json.dumps(to_dict(cfg))
    assert cli_main(["comply", str(compliant), "--config-json", cfg_json]) == 1
    out = tmp_path / "c.json"
    assert cli_main(["comply", str(compliant), "--config-json", cfg_json, "--report-only", "--json-out", str(out)]) == 0
    assert json.loads(out.read_text())["failed_rules"] == ["mode"]
    capsys.readouterr()


def test_the_comply_rule_gates_a_record_run_and_reports_a_sweep(compliant, tmp_path, capsys):
    """What the Snakemake rule runs (workflow/scripts/comply.py -> run_comply): a failing record writes no
    comply.json (so aggregate cannot run), a failing sweep writes its verdicts and goes on."""
    record_out, sweep_out = tmp_path / "record.json", tmp_path / "sweep.json"
    assert comply.run_comply(compliant, record_config(), json_out=record_out) == 0 and record_out.exists()
    failing_record = record_config(seeds=(42, 0, 1234, 7))  # seed 7 has no records
    assert comply.run_comply(compliant, failing_record, json_out=tmp_path / "no.json") == 1
    assert not (tmp_path / "no.json").exists()
    assert comply.run_comply(compliant, record_config(mode="sweep"), json_out=sweep_out) == 0
    assert json.loads(sweep_out.read_text())["failed_rules"] == ["mode"]
    capsys.readouterr()


def test_prequant_ttt_on_validation_tokens_is_rejected(compliant, tmp_path):
    """pr1487: the checkpoint says AdamW epochs ran on validation tokens before GPTQ."""
    import shutil

    shutil.copytree(compliant.parent, tmp_path / "results")
    run_dir = tmp_path / "results" / "record"
    _edit(run_dir / "seed42" / "train" / "checkpoint" / "checkpoint.json",
          lambda c: c.update(prequant_ttt_val_tokens=47_851_520))
    verdict = verdicts_by_rule(run_dir, record_config())["no_prequant_ttt"]
    assert verdict.status == comply.FAIL
    assert "seed42" in verdict.evidence and "prequant_ttt_val_tokens = 47851520" in verdict.evidence


def test_undeclared_and_missing_seeds_are_rejected(compliant, tmp_path):
    import shutil

    shutil.copytree(compliant.parent, tmp_path / "results")
    run_dir = tmp_path / "results" / "record"
    shutil.copytree(run_dir / "seed0", run_dir / "seed7")  # a fourth seed nobody declared
    verdict = verdicts_by_rule(run_dir, record_config())["seeds"]
    assert verdict.status == comply.FAIL and "undeclared seeds [7]" in verdict.evidence
    verdict = verdicts_by_rule(run_dir, record_config(seeds=[42, 0, 1234, 7, 9]))["seeds"]
    assert verdict.status == comply.FAIL and "declared but absent: [9]" in verdict.evidence


def test_budgets_and_size(compliant, tmp_path):
    import shutil

    shutil.copytree(compliant.parent, tmp_path / "results")
    run_dir = tmp_path / "results" / "record"
    _edit(run_dir / "seed0" / "hessians" / "hessian_report.json", lambda h: h.update(hessian_seconds=9.0))
    _edit(run_dir / "seed0" / "eval" / "eval.json",
          lambda e: e["timings"].update(score_s=560.0, total_s=606.0))
    _edit(run_dir / "seed42" / "gate" / "gate_report.json",
          lambda g: g.update(model_bytes=15_970_000, total_bytes=16_002_000, ok=False))
    v = verdicts_by_rule(run_dir, record_config())
    assert v["train_time"].status == comply.FAIL and "seed0 591.5+9.0=600.5 s (over by 0.5 s)" in v["train_time"].evidence
    assert v["eval_time"].status == comply.FAIL and "over by 6.0 s" in v["eval_time"].evidence
    assert v["size"].status == comply.FAIL and "seed42: 16,002,000 bytes, over by 2,000" in v["size"].evidence


def test_train_time_names_the_budget_reading_with_both_figures(compliant, tmp_path):
    import shutil

    shutil.copytree(compliant.parent, tmp_path / "results")
    run_dir = tmp_path / "results" / "record"
    for seed in RECORD_BPB:  # PR #1855's run: the loop stops after 599.6 s, the Hessians take 4.7 s after it
        _edit(run_dir / f"seed{seed}" / "train" / "train_summary.json",
              lambda s: s.update(train_seconds=599.6, budget_reading="record"))
        _edit(run_dir / f"seed{seed}" / "hessians" / "hessian_report.json", lambda h: h.update(hessian_seconds=4.7))
    v = verdicts_by_rule(run_dir, record_config())["train_time"]
    assert v.status == comply.PASS and "reading 'record'" in v.title
    assert "seed42 loop 599.6 s (strict reading 599.6+4.7=604.3 s, over by 4.3 s)" in v.evidence
    for seed in RECORD_BPB:  # the same times under pgolf's strict reading (the default of older runs: no key)
        _edit(run_dir / f"seed{seed}" / "train" / "train_summary.json", lambda s: s.pop("budget_reading"))
    v = verdicts_by_rule(run_dir, record_config())["train_time"]
    assert v.status == comply.FAIL and v.title.startswith("training + Hessians <= 600 s")
    assert "seed42 599.6+4.7=604.3 s (over by 4.3 s)" in v.evidence


def test_budgets_off_record_hardware_are_not_applicable(compliant, tmp_path):
    import shutil

    shutil.copytree(compliant.parent, tmp_path / "results")
    run_dir = tmp_path / "results" / "record"
    for seed in RECORD_BPB:
        _edit(run_dir / f"seed{seed}" / "train" / "train_summary.json", lambda s: s.update(world_size=1))
        _edit(run_dir / f"seed{seed}" / "eval" / "eval.json", lambda e: e.update(environment={"gpu": None}))
    v = verdicts_by_rule(run_dir, record_config())
    assert v["train_time"].status == comply.NOT_APPLICABLE and "1 x NVIDIA H100" in v["train_time"].evidence
    assert v["eval_time"].status == comply.NOT_APPLICABLE and "on 8 x CPU" in v["eval_time"].evidence
    assert comply.is_compliant(list(v.values()))


def test_missing_evidence_fails_naming_the_file(tmp_path):
    run_dir = tmp_path / "results" / "record"
    run_dir.mkdir(parents=True)
    v = verdicts_by_rule(run_dir, record_config())
    assert v["val_docs"].status == comply.FAIL and "verified.json: missing" in v["val_docs"].evidence
    assert v["ttt_ledger"].status == comply.FAIL and "eval/eval.json: missing" in v["ttt_ledger"].evidence
    assert v["seeds"].status == comply.FAIL


def test_pr1487_recipe_comes_out_non_compliant(compliant, tmp_path):
    """The pr1487 recipe (sweep, pre-quant TTT) on a run whose checkpoints say validation tokens were trained on."""
    import shutil

    from pgolf.config import load_run_config
    from pgolf.config.recipes import recipe_path

    recipe = load_run_config(recipe_path("pr1487"))
    cfg = parse_run_config({**to_dict(recipe), "seeds": list(RECORD_BPB), "data": {**to_dict(recipe.data), "name": DATA_NAME}},
                           "pr1487")
    shutil.copytree(compliant.parent, tmp_path / "results")
    run_dir = tmp_path / "results" / "record"
    for seed in RECORD_BPB:
        _edit(run_dir / f"seed{seed}" / "train" / "checkpoint" / "checkpoint.json",
              lambda c: c.update(prequant_ttt_val_tokens=10 * 47_851_520,
                                 train_config={**c["train_config"], "prequant_ttt_epochs": 10}))
        _edit(run_dir / f"seed{seed}" / "eval" / "eval.json", lambda e: e.update(mode="sweep"))
    verdicts = verdicts_by_rule(run_dir, cfg)
    assert sorted(r for r, v in verdicts.items() if v.status == comply.FAIL) == ["mode", "no_prequant_ttt"]
    evidence = verdicts["no_prequant_ttt"].evidence
    assert "recipe: train.prequant_ttt_epochs = 10" in evidence and "seed1234" in evidence


def test_size_falls_back_to_the_pack_report_of_a_one_process_record_run(compliant, tmp_path):
    """pgolf.artifact.record_run writes no gate/ folder: its pack report carries the gate's fields."""
    import shutil

    shutil.copytree(compliant.parent, tmp_path / "results")
    run_dir = tmp_path / "results" / "record"
    for seed in RECORD_BPB:
        shutil.rmtree(run_dir / f"seed{seed}" / "gate")
        _edit(run_dir / f"seed{seed}" / "pack" / "pack_report.json", lambda p: p.update(code_file=None))
    verdict = verdicts_by_rule(run_dir, record_config())["size"]  # a staged pack report gates the model alone
    assert verdict.status == comply.FAIL and "did not count the code" in verdict.evidence
    for seed in RECORD_BPB:
        _edit(run_dir / f"seed{seed}" / "pack" / "pack_report.json", lambda p: p.update(code_file="train_gpt.py"))
    assert verdicts_by_rule(run_dir, record_config())["size"].status == comply.PASS
    _edit(run_dir / "seed0" / "pack" / "pack_report.json", lambda p: p.update(cap=15_990_000))
    assert verdicts_by_rule(run_dir, record_config())["size"].status == comply.PASS  # tighter than the rules: fine
    _edit(run_dir / "seed0" / "pack" / "pack_report.json", lambda p: p.update(cap=17_000_000))
    verdict = verdicts_by_rule(run_dir, record_config())["size"]
    assert verdict.status == comply.FAIL and "seed0: gate cap 17,000,000 is looser than the rules' 16,000,000" in verdict.evidence


def test_evaluation_on_other_data_than_the_verified_is_rejected(compliant, tmp_path):
    import shutil

    shutil.copytree(compliant.parent, tmp_path / "results")
    run_dir = tmp_path / "results" / "record"
    _edit(run_dir / "seed0" / "eval" / "eval.json",
          lambda e: e.update(data={"data_dir": f"results/data/{DATA_NAME}/shards", "max_docs": 0}))
    assert verdicts_by_rule(run_dir, record_config())["val_docs"].status == comply.PASS
    _edit(run_dir / "seed0" / "eval" / "eval.json",
          lambda e: e.update(data={"data_dir": "results/data/other/shards", "max_docs": 0}))
    verdict = verdicts_by_rule(run_dir, record_config())["val_docs"]
    assert verdict.status == comply.FAIL and "seed0: evaluated results/data/other/shards, not the verified" in verdict.evidence


def test_kept_warm_up_momentum_is_stated_not_failed(compliant, tmp_path):
    """train.warmup_restore record (the record's practice) keeps the Muon momentum of untimed warm-up steps on
    training data: the training-time verdict says so for each seed, and still judges the timed loop."""
    import shutil

    shutil.copytree(compliant.parent, tmp_path / "results")
    run_dir = tmp_path / "results" / "record"
    _edit(run_dir / "seed0" / "train" / "train_summary.json", lambda s: s.update(warmup_restore="record"))
    verdict = verdicts_by_rule(run_dir, record_config())["train_time"]
    assert verdict.status == comply.PASS
    assert verdict.evidence.count("warm-up steps on training data kept") == 1 and "seed0 " in verdict.evidence


def test_the_size_verdict_is_the_scored_artifacts(compliant, tmp_path):
    """An evaluation of another artifact than the gated one (pgolf evaluate --allow-hash-mismatch) fails the size
    rule: the bytes claimed must be those of the artifact that was scored."""
    import shutil

    shutil.copytree(compliant.parent, tmp_path / "results")
    run_dir = tmp_path / "results" / "record"
    assert verdicts_by_rule(run_dir, record_config())["size"].status == comply.PASS
    _edit(run_dir / "seed0" / "eval" / "eval.json", lambda e: e.update(artifact_sha256="f" * 64))
    verdict = verdicts_by_rule(run_dir, record_config())["size"]
    assert verdict.status == comply.FAIL and "seed0: the scored artifact (ffffffffffffffff...) is not the one gated" in verdict.evidence
