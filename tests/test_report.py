"""The aggregate stage on fake per-seed result files: statistics, units, verdicts, provenance, missing seeds."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from pgolf.config import AggregateConfig, ConfigError, from_mapping
from pgolf.cli import main as pgolf_main
from pgolf.report.aggregate import MixedProvenanceError, aggregate, run_report
from pgolf.report.results import MissingSeed, ResultsError, load_seed, load_seeds
from pgolf.report.summary import summary_text
from report_fixtures import (
    BYTE_SUM,
    CPU_STAGES,
    RECORD_BPB,
    TOKEN_COUNT,
    make_code_bundle,
    make_cpu_run,
    make_run,
    make_seed,
    nats_from_bpb,
)

PR1787 = {
    "baseline_name": "pr1787",
    "baseline_mean": 1.06335,
    "baseline_n": 3,
    "date": "2026-11-24",
    "submission_name": "Test_Run",
}
SEEDS = list(RECORD_BPB)


def agg_config(**overrides) -> AggregateConfig:
    return from_mapping(AggregateConfig, {**PR1787, **overrides}, "aggregate")


def test_statistics_units_and_labels(tmp_path):
    run_dir = make_run(tmp_path)
    agg = run_report(run_dir, agg_config(), SEEDS, comply_path=run_dir / "comply.json")
    bpb = np.array(list(RECORD_BPB.values()))
    nats = np.array([nats_from_bpb(v) for v in bpb])
    assert agg["std_kind"] == "sample (ddof=1)"
    assert agg["val_bpb"]["mean"] == pytest.approx(bpb.mean(), rel=1e-12)
    assert agg["val_bpb"]["std_sample_ddof1"] == pytest.approx(bpb.std(ddof=1), rel=1e-9)
    assert agg["val_bpb"]["std_population_ddof0"] == pytest.approx(bpb.std(ddof=0), rel=1e-9)
    assert agg["val_loss_nats_per_token"]["std_sample_ddof1"] == pytest.approx(nats.std(ddof=1), rel=1e-9)
    # nats per token = bpb * ln 2 * bytes / tokens, with the run's own counts
    assert agg["nats_per_bpb"] == pytest.approx(math.log(2) * BYTE_SUM / TOKEN_COUNT, rel=1e-12)
    sig = agg["significance"]
    assert sig["unit"] == "nats_per_token" and sig["test"] == "one_sample"  # pr1787's std is not published
    improvement_bpb = 1.06335 - bpb.mean()
    assert sig["improvement_bpb"] == pytest.approx(improvement_bpb, rel=1e-9)
    assert sig["improvement_nats_per_token"] == pytest.approx(improvement_bpb * agg["nats_per_bpb"], rel=1e-9)
    assert sig["delta_bpb"] == pytest.approx(-improvement_bpb, rel=1e-9)
    # by hand: t = improvement / (s / sqrt(n)), df = 2; P(T > t) for 2 df in closed form
    t = improvement_bpb / (bpb.std(ddof=1) / math.sqrt(3))
    assert sig["t"] == pytest.approx(t, rel=1e-9) and sig["df"] == pytest.approx(2.0)
    assert sig["p_value"] == pytest.approx(0.5 - t / (2 * math.sqrt(2 + t * t)), rel=1e-9)
    # the record beat pr1787 by 0.00497 nats per token: just under the README's 0.005, p ~ 0.036
    assert not sig["readme_pass"] and sig["progression_pass"]
    assert agg["verdict"]["status"] == "progression"
    for name in ("aggregate.json", "seeds.csv", "report.html", "submission.json"):
        assert (run_dir / name).exists()
    table = (run_dir / "seeds.csv").read_text().splitlines()
    assert table[0].startswith("seed,val_loss_nats_per_token,val_bpb,steps,ms_per_step,artifact_bytes")
    assert len(table) == 4


def test_unit_bpb_gives_the_same_p_and_a_converted_threshold(tmp_path):
    run_dir = make_run(tmp_path)
    seeds, missing = load_seeds(run_dir, SEEDS)
    nats = aggregate(seeds, missing, agg_config(), "record", "r")["significance"]
    bpb = aggregate(seeds, missing, agg_config(unit="bpb"), "record", "r")["significance"]
    assert bpb["p_value"] == pytest.approx(nats["p_value"], rel=1e-10)
    assert bpb["improvement_in_unit"] == pytest.approx(nats["improvement_bpb"], rel=1e-10)
    ratio = math.log(2) * BYTE_SUM / TOKEN_COUNT
    assert bpb["readme_threshold_in_unit"] == pytest.approx(0.005 / ratio, rel=1e-12)  # ~0.0023 bpb
    assert 0.0022 < bpb["readme_threshold_in_unit"] < 0.0024


def test_the_readme_rules_null_hypothesis_is_a_named_choice(tmp_path):
    """Three seeds 0.0051 nats per token better than the baseline with little spread: their improvement is
    significantly above zero (p << 0.01) but not significantly above the 0.005 threshold. ``readme_null: zero``
    (the default) passes the README rule, ``threshold`` does not; both p-values are reported either way. The
    shifted test equals the plain one against a baseline moved by the threshold, computed by hand."""
    ratio = math.log(2) * BYTE_SUM / TOKEN_COUNT  # nats per token per bpb of the fixtures
    target_bpb = 1.0810 - 0.0051 / ratio
    run_dir = make_run(tmp_path, {42: target_bpb - 0.0003, 0: target_bpb, 1234: target_bpb + 0.0003})
    seeds, missing = load_seeds(run_dir, SEEDS)
    base = {"baseline_mean": 1.0810, "baseline_n": 3}
    zero = aggregate(seeds, missing, agg_config(**base), "record", "r")["significance"]
    shifted = aggregate(seeds, missing, agg_config(**base, readme_null="threshold"), "record", "r")["significance"]
    a = np.array([nats_from_bpb(v) for v in (target_bpb - 0.0003, target_bpb, target_bpb + 0.0003)])
    t = (1.0810 * ratio - 0.005 - a.mean()) / (a.std(ddof=1) / math.sqrt(3))  # one-sample, df 2, closed form
    for sig in (zero, shifted):
        assert sig["p_value_vs_threshold"] == pytest.approx(0.5 - t / (2 * math.sqrt(2 + t * t)), rel=1e-9)
        assert sig["p_value"] < 0.01 < sig["p_value_vs_threshold"] and sig["improvement_nats_per_token"] > 0.005
    assert zero["readme_pass"] and not shifted["readme_pass"]
    assert (zero["readme_null"], shifted["readme_null"]) == ("zero", "threshold")
    assert zero["baseline_nats_per_token"] == {"mean": pytest.approx(1.0810 * ratio), "std_sample_ddof1": None, "n": 3}


def test_a_published_population_std_is_tested_as_the_sample_std(tmp_path):
    """PR #1855 publishes val_bpb_std with ddof=0: ``baseline_std_ddof: 0`` converts it (times sqrt(n/(n-1)))."""
    run_dir = make_run(tmp_path)
    seeds, missing = load_seeds(run_dir, SEEDS)
    given = {"baseline_std": 0.0009, "baseline_n": 3}
    sample = aggregate(seeds, missing, agg_config(**given), "record", "r")
    population = aggregate(seeds, missing, agg_config(**given, baseline_std_ddof=0), "record", "r")
    assert sample["baseline"]["bpb"]["std_sample_ddof1"] == pytest.approx(0.0009, rel=1e-12)
    assert population["baseline"]["bpb"]["std_sample_ddof1"] == pytest.approx(0.0009 * math.sqrt(1.5), rel=1e-12)
    assert population["significance"]["p_value"] > sample["significance"]["p_value"]


def test_baseline_seed_values_run_a_welch_test_in_nats(tmp_path):
    """Per-seed baseline values given in bpb are converted to nats per token before the Welch test."""
    run_dir = make_run(tmp_path)
    seeds, missing = load_seeds(run_dir, SEEDS)
    base = [1.0632, 1.0634, 1.06365]
    cfg = agg_config(baseline_mean=None, baseline_n=0, baseline_seed_values=base)
    sig = aggregate(seeds, missing, cfg, "record", "r")["significance"]
    ratio = math.log(2) * BYTE_SUM / TOKEN_COUNT
    a = np.array([v * ratio for v in RECORD_BPB.values()])
    b = np.array(base) * ratio
    va, vb = a.var(ddof=1) / 3, b.var(ddof=1) / 3
    assert sig["test"] == "welch"
    assert sig["t"] == pytest.approx((b.mean() - a.mean()) / math.sqrt(va + vb), rel=1e-9)
    assert sig["df"] == pytest.approx((va + vb) ** 2 / (va**2 / 2 + vb**2 / 2), rel=1e-9)


def test_verdicts_record_and_not_significant(tmp_path):
    good = make_run(tmp_path / "good", {42: 1.0500, 0: 1.0510, 1234: 1.0505})
    agg = run_report(good, agg_config(), SEEDS, comply_path=good / "comply.json")
    assert agg["significance"]["readme_pass"] and agg["verdict"]["status"] == "record"
    flat = make_run(tmp_path / "flat", {42: 1.0620, 0: 1.0650, 1234: 1.0640})
    agg = run_report(flat, agg_config(), SEEDS, comply_path=flat / "comply.json")
    assert agg["verdict"] == {"status": "non-record", "reasons": ["no significant improvement over the baseline"]}
    sweep = run_report(good, agg_config(), SEEDS, mode="sweep")
    assert sweep["verdict"]["status"] == "non-record" and "mode is 'sweep'" in sweep["verdict"]["reasons"][0]


def test_compliance_blockers(tmp_path):
    """Significant, but over the byte cap, on one H200, evaluated in sweep mode, no comply.json: not a record, each
    reason listed."""
    run_dir = tmp_path / "results" / "r"
    sha = make_code_bundle(run_dir)
    make_seed(run_dir, 42, 1.050, code_sha256=sha, total_bytes=16_000_001)
    make_seed(run_dir, 0, 1.051, code_sha256=sha)
    env = {"torch": "2.11.0", "gpu": "NVIDIA H200", "gpu_count": 1}
    make_seed(run_dir, 1234, 1.0505, code_sha256=sha, env=env, world_size=1, eval_mode="sweep")
    agg = run_report(run_dir, agg_config(allow_mixed_provenance=True), SEEDS)
    reasons = " | ".join(agg["verdict"]["reasons"])
    assert agg["verdict"]["status"] == "non-record"
    assert "seed 42: artifact 16,000,001 bytes is over the 16,000,000-byte cap" in reasons
    assert "evaluated in mode 'sweep' (seed 1234)" in reasons
    assert "not the record-track 8xH100: trained on 1 process, NVIDIA H200 (seed 1234)" in reasons
    assert "no compliance verdicts (comply.json)" in reasons


def test_an_h100_that_is_not_the_sxm_part_is_not_record_hardware(tmp_path):
    """The 600 s budgets are stated for 8 x H100 SXM: an H100 PCIe or NVL run is reported off record hardware."""
    from pgolf.compliance.provenance import is_record_gpu

    assert is_record_gpu("NVIDIA H100 80GB HBM3") and is_record_gpu("NVIDIA H100 SXM5 80GB")
    assert not any(map(is_record_gpu, ("NVIDIA H100 PCIe", "NVIDIA H100 NVL", "NVIDIA H200", None)))
    run_dir = tmp_path / "results" / "r"
    sha = make_code_bundle(run_dir)
    for seed, bpb in RECORD_BPB.items():
        make_seed(run_dir, seed, bpb, code_sha256=sha, env={"torch": "2.11.0", "gpu": "NVIDIA H100 PCIe",
                                                            "gpu_count": 8})
    agg = run_report(run_dir, agg_config(), SEEDS)
    assert agg["record_hardware"] is False and agg["verdict"]["status"] == "non-record"
    assert "not the record-track 8xH100: trained on 8 processes, NVIDIA H100 PCIe" in " | ".join(agg["verdict"]["reasons"])


def test_a_report_of_fewer_seeds_than_compliance_checked_is_no_record(tmp_path):
    """Reporting the two best of the three seeds compliance saw would pick seeds after their scores were known."""
    run_dir = make_run(tmp_path)
    best_two = sorted(RECORD_BPB, key=RECORD_BPB.get)[:2]
    agg = run_report(run_dir, agg_config(), best_two, comply_path=run_dir / "comply.json")
    assert agg["verdict"]["status"] == "non-record"
    assert f"comply.json checked the seeds {SEEDS}, this report takes {sorted(best_two)}" in agg["verdict"]["reasons"][0]
    every = run_report(run_dir, agg_config(), SEEDS[::-1], comply_path=run_dir / "comply.json")  # any order
    assert every["verdict"]["status"] != "non-record" and not [r for r in every["verdict"]["reasons"] if "comply" in r]


def test_pooled_seeds_of_different_bytes_per_token_keep_the_headline_delta(tmp_path):
    """Mixed provenance pooled on purpose (another validation token count): delta_vs_leaderboard_bpb is still the
    headline's mean val_bpb minus the baseline, and the folder passes its own check."""
    from pgolf.report.folder import check_folder

    run_dir = tmp_path / "results" / "r"
    sha = make_code_bundle(run_dir)
    for seed, bpb in RECORD_BPB.items():
        make_seed(run_dir, seed, bpb, code_sha256=sha, token_count=40_000_000 if seed == 0 else TOKEN_COUNT)
    agg = run_report(run_dir, agg_config(allow_mixed_provenance=True), SEEDS)
    sub = json.loads((run_dir / "submission.json").read_text())
    expected = float(np.mean(list(RECORD_BPB.values()))) - PR1787["baseline_mean"]
    assert sub["delta_vs_leaderboard_bpb"] == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert check_folder(agg["submission_folder"]) == []


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    for dotted, value in changes.items():
        node, *parents, key = [data, *dotted.split("__")]
        for part in parents:
            node = node[part]
        node[key] = value
    path.write_text(json.dumps(data))


def test_the_rules_limits_bind_whatever_the_seeds_reports_say(tmp_path):
    """The size cap and the evaluation budget are the rules' (16,000,000 bytes, 600 s), not the ones a recipe
    gated or timed against; a size from a pack report that counted no code is no size; a failed comply rule blocks.
    Each alone turns an otherwise record run into a non-record."""
    cases = {
        "cap": ("seed42/pack/pack_report.json", {"cap": 17_000_000, "total_bytes": 16_500_000, "model_bytes": 16_500_000 - 32_000},
                ["seed 42: artifact 16,500,000 bytes is over the 16,000,000-byte cap",
                 "gated against a cap of 17,000,000 bytes, looser than the rules' 16,000,000 (seed 42)"]),
        "code": ("seed0/pack/pack_report.json", {"code_file": None, "code_bytes": 0, "model_bytes": 15_900_000},
                 ["size without the code: no gate report, and the pack report counted no code file (seed 0)"]),
        "eval": ("seed1234/eval/eval.json", {"timings__total_s": 800.0},
                 ["seed 1234: evaluation took 800.0 s, over its budget (600 s in the rules)"]),
        "comply": ("comply.json", {"compliant": False, "verdicts": [{"rule": "val_docs", "status": "FAIL"}]},
                   ["compliance checks failed (comply.json): val_docs"]),
    }
    for name, (rel, changes, expected) in cases.items():
        run_dir = make_run(tmp_path / name, {42: 1.0500, 0: 1.0510, 1234: 1.0505})
        assert run_report(run_dir, agg_config(), SEEDS, comply_path=run_dir / "comply.json",
                          make_folder=False)["verdict"]["status"] == "non-record"  # the code is not checked
        _edit_json(run_dir / rel, **changes)
        agg = run_report(run_dir, agg_config(), SEEDS, comply_path=run_dir / "comply.json")
        assert agg["verdict"]["status"] == "non-record", name
        assert set(expected) <= set(agg["verdict"]["reasons"]), (name, agg["verdict"]["reasons"])


def test_the_training_budget_is_read_as_the_run_declared(tmp_path):
    """As comply judges it: under budget_reading record the loop alone meets the 600 s (the record's own reading),
    under strict the loop and the Hessians together."""
    verdicts = {}
    for reading in ("record", "strict"):
        run_dir = make_run(tmp_path / reading, {42: 1.0500, 0: 1.0510, 1234: 1.0505})
        for seed in SEEDS:
            _edit_json(run_dir / f"seed{seed}" / "train" / "train_summary.json", train_seconds=599.4,
                       budget_reading=reading)
        verdicts[reading] = run_report(run_dir, agg_config(), SEEDS, comply_path=run_dir / "comply.json")["verdict"]
    assert verdicts["record"]["status"] == "record"
    assert "seed 42: training + Hessians took 606.9 s > 600 s" in verdicts["strict"]["reasons"]


def test_stage_means_are_over_the_seeds_with_every_stage(tmp_path):
    """A seed evaluated without its checkpoint has no pre-quant figure: the chain pre -> post -> scored and its
    deltas are taken over the seeds that have every stage, and say so, so that the columns add up."""
    run_dir = tmp_path / "results" / "r"
    sha = make_code_bundle(run_dir)
    make_seed(run_dir, 42, 1.05, code_sha256=sha, stages=(1.06, 1.07))
    make_seed(run_dir, 0, 1.05, code_sha256=sha, stages=(1.06, 1.07))
    make_seed(run_dir, 1234, 1.20, code_sha256=sha)  # no diagnostics
    agg = run_report(run_dir, agg_config(), SEEDS, comply_path=None, make_folder=False)
    st = agg["stages"]
    assert st["seeds"] == [42, 0] and st["ttt"]["mean"] == pytest.approx(1.05)
    assert st["ttt_delta"]["mean"] == pytest.approx(st["ttt"]["mean"] - st["post_quant"]["mean"])
    from pgolf.report.summary import closing_summary

    assert "-> scored 1.05000 (-0.02000) (the 2 seeds with every stage)" in closing_summary(run_dir)
    html = (run_dir / "report.html").read_text()
    assert "\u2192 scored 1.05000 (the 2 seeds with every stage)" in html and "mean of 42, 0" in html


def test_seeds_without_spread_and_a_diverged_seed(tmp_path):
    """Three seeds with the same loss against a baseline mean: the standard error is 0, t is left out (JSON has no
    infinity), p is 0 and the one-sample test keeps n - 1 degrees of freedom; such seeds did not vary the run, so
    they make no record. A seed whose loss is NaN is a failed seed, listed with the missing ones."""
    run_dir = make_run(tmp_path, {42: 1.0500, 0: 1.0500, 1234: 1.0500})
    agg = run_report(run_dir, agg_config(), SEEDS, comply_path=run_dir / "comply.json")
    sig = agg["significance"]
    assert "t" not in sig and sig["p_value"] == 0.0 and sig["df"] == 2.0 and "standard error 0" in sig["note"]
    assert sig["readme_pass"] and agg["verdict"]["status"] == "non-record"
    assert any(r.startswith("every seed gave the same val_loss") for r in agg["verdict"]["reasons"])
    assert "one-sided one_sample t = inf" in summary_text(agg)
    (run_dir / "seed0" / "eval" / "eval.json").write_text(
        (run_dir / "seed0" / "eval" / "eval.json").read_text().replace('"val_loss": ', '"val_loss": NaN, "x": '))
    agg = run_report(run_dir, agg_config(), SEEDS, comply_path=run_dir / "comply.json", make_folder=False)
    (failed,) = agg["missing_seeds"]
    assert failed["seed"] == 0 and failed["reason"].endswith("val_loss is nan (the run diverged)")
    assert "missing seeds: 0" in agg["verdict"]["reasons"]


@pytest.mark.parametrize(
    "fields,kwargs,label",
    [
        (["code_hash", "eval_code_hash"], {"code_hash": "e" * 64}, "pgolf code hash at training"),
        (["data_manifest_sha256"], {"data_sha": "f" * 64}, "data manifest sha256"),
        (["config_sha256"], {"model_config": {"num_layers": 12, "model_dim": 512}}, "stage configs sha256"),
        (["validation_counts"], {"token_count": TOKEN_COUNT - 1}, "validation target tokens / bytes"),
    ],
)
def test_mixing_is_refused_unless_allowed(tmp_path, fields, kwargs, label):
    run_dir = make_run(tmp_path)
    make_seed(run_dir, 1234, RECORD_BPB[1234], **kwargs)
    seeds, missing = load_seeds(run_dir, SEEDS)
    with pytest.raises(MixedProvenanceError, match=rf"{label} differs .*seeds \[42, 0\].*seeds \[1234\]"):
        aggregate(seeds, missing, agg_config(), "record", "r")
    agg = aggregate(seeds, missing, agg_config(allow_mixed_provenance=True), "record", "r")
    mixed = agg["provenance"]["mixed"]
    assert [d["field"] for d in mixed] == fields
    assert sorted(mixed[0]["values"].values()) == [[42, 0], [1234]]
    assert agg["verdict"]["status"] == "non-record" and any("mixed provenance" in r for r in agg["verdict"]["reasons"])


def test_cli_refuses_mixing_with_a_clear_error(tmp_path, capsys):
    run_dir = make_run(tmp_path)
    make_seed(run_dir, 0, RECORD_BPB[0], code_hash="e" * 64)
    code = pgolf_main(["report", "--run-dir", str(run_dir), "--aggregate-json", json.dumps(PR1787), "--seeds", "42", "0", "1234"])
    assert code == 2
    err = capsys.readouterr().err
    assert "refusing to pool seeds of different provenance" in err and "allow_mixed_provenance" in err
    assert not (run_dir / "aggregate.json").exists()


def test_missing_seed_is_listed_and_the_rest_aggregated(tmp_path, capsys):
    run_dir = make_run(tmp_path)
    (run_dir / "seed1234" / "eval" / "eval.json").unlink()  # seed 1234 failed under --keep-going
    code = pgolf_main(["report", "--run-dir", str(run_dir), "--aggregate-json", json.dumps(PR1787), "--seeds", "42", "0", "1234"])
    assert code == 0
    assert "MISSING seeds: 1234" in capsys.readouterr().out
    agg = json.loads((run_dir / "aggregate.json").read_text())
    assert agg["seeds"] == [42, 0]
    assert agg["missing_seeds"][0]["seed"] == 1234
    assert agg["missing_seeds"][0]["missing_files"][0].endswith("seed1234/eval/eval.json")
    assert agg["val_bpb"]["mean"] == pytest.approx((RECORD_BPB[42] + RECORD_BPB[0]) / 2)
    assert agg["verdict"]["status"] == "non-record" and "missing seeds: 1234" in agg["verdict"]["reasons"]
    assert "id='missing-seeds'" in (run_dir / "report.html").read_text()
    sub = json.loads((run_dir / "submission.json").read_text())
    assert sub["missing_seeds"] == [1234] and sorted(sub["seed_results"]) == ["0", "42"]


def test_all_seeds_missing_is_an_error(tmp_path):
    run_dir = tmp_path / "results" / "empty"
    run_dir.mkdir(parents=True)
    with pytest.raises(ResultsError, match="no seed has complete results"):
        run_report(run_dir, agg_config(), [1, 2])


def test_malformed_files_name_the_file_and_key(tmp_path):
    run_dir = make_run(tmp_path)
    path = run_dir / "seed42" / "eval" / "eval.json"
    data = json.loads(path.read_text())
    del data["val_bpb"]
    path.write_text(json.dumps(data))
    with pytest.raises(ResultsError, match=r"seed42/eval/eval.json: missing key 'val_bpb'"):
        load_seed(run_dir, 42)
    data["val_bpb"] = "1.06"
    path.write_text(json.dumps(data))
    with pytest.raises(ResultsError, match=r"key 'val_bpb' expected a finite number, got str"):
        load_seed(run_dir, 42)
    data["val_bpb"] = RECORD_BPB[42]
    data["artifact_sha256"] = "0" * 64
    path.write_text(json.dumps(data))
    with pytest.raises(ResultsError, match="evaluation scored a different artifact"):
        load_seed(run_dir, 42)
    data["artifact_sha256"] = json.loads((run_dir / "seed42/pack/pack_report.json").read_text())["artifact_sha256"]
    data["val_bpb"] = RECORD_BPB[42] + 0.01  # inconsistent with val_loss and the counts
    path.write_text(json.dumps(data))
    with pytest.raises(ResultsError, match="val_bpb .* disagrees with val_loss"):
        load_seed(run_dir, 42)
    shutil.rmtree(run_dir / "seed0" / "pack")
    outcome = load_seed(run_dir, 0)
    assert isinstance(outcome, MissingSeed) and "pack_report.json" in outcome.reason


def test_aggregate_config_validation():
    with pytest.raises(ConfigError, match="give one of them"):
        agg_config(baseline_seed_values=[1.0, 1.1])
    with pytest.raises(ConfigError, match="baseline_n: a known baseline_std needs >= 2 seeds"):
        agg_config(baseline_std=0.001, baseline_n=1)
    with pytest.raises(ConfigError, match="submission_name: expected letters"):
        agg_config(submission_name="a/b")
    with pytest.raises(ConfigError, match="readme_p: expected 0 < p < 1"):
        agg_config(readme_p=1.5)
    assert not from_mapping(AggregateConfig, {}, "aggregate").has_baseline


def test_no_baseline_means_no_test(tmp_path):
    run_dir = make_run(tmp_path)
    agg = run_report(run_dir, from_mapping(AggregateConfig, {"date": "2026-11-24"}, "aggregate"), SEEDS, mode="sweep")
    assert agg["significance"]["tested"] is False and agg["baseline"] is None
    sub = json.loads((run_dir / "submission.json").read_text())
    assert sub["comparison_baseline_bpb"] is None and sub["delta_vs_leaderboard_bpb"] is None
    assert sub["name"] == "record"  # empty submission_name: the run's name


def test_closing_summary_names_the_figures_and_the_files(tmp_path):
    """What a finished run prints last (Snakefile onsuccess) and `pgolf summary RUN_DIR` prints."""
    from report_fixtures import CPU_DOCS, make_cpu_run

    from pgolf.cli import main as pgolf_main
    from pgolf.report.summary import closing_summary

    run_dir = make_cpu_run(tmp_path)
    assert "no aggregate.json yet" in closing_summary(run_dir)
    run_report(run_dir, agg_config(date="2026-12-04"), [1, 2, 3], mode="sweep", comply_path=run_dir / "comply.json")
    text = closing_summary(run_dir)
    assert text.startswith("pgolf: run smoke (sweep) finished: 3 seeds [1, 2, 3]")
    assert "pre-quant 3.65582 -> post-quant 3.65856 (+0.00274) -> scored 3.65305 (-0.00552)" in text
    assert f"scored {CPU_DOCS[0]} of {CPU_DOCS[1]} validation documents per seed" in text
    assert "verdict non-record; compliance FAIL: 6 pass, 2 fail (mode, val_docs), 2 not applicable" in text
    assert (run_dir / "report.html").resolve().as_uri() in text and str(run_dir / "submission.json") in text
    assert "records     " + str(next((run_dir / "records").glob("track_*/*"))) in text
    assert pgolf_main(["summary", str(run_dir)]) == 0
    assert pgolf_main(["summary", str(tmp_path / "nowhere")]) == 2
    # a damaged aggregate.json is said to be one, never a traceback nor "not yet"
    aggregate = run_dir / "aggregate.json"
    for damaged in ("[]", '{"val_bpb": ', "{}", '{"val_bpb": "x"}'):
        aggregate.write_text(damaged)
        text = closing_summary(run_dir)
        assert f"{aggregate} is unreadable or lacks a figure" in text and "--forcerun aggregate" in text, damaged


def test_closing_summary_names_the_folder_this_report_wrote(tmp_path):
    """A report rerun by hand under another date leaves the earlier folder in place: the summary names the new one,
    found from aggregate.json under the run folder whatever directory the command ran from."""
    from report_fixtures import make_cpu_run

    from pgolf.report.summary import closing_summary

    run_dir = make_cpu_run(tmp_path)
    for date in ("2026-12-09", "2026-12-04"):  # the later name first: sorting by name would pick the stale one
        run_report(run_dir, agg_config(date=date), [1, 2, 3], mode="sweep")
    assert len(list((run_dir / "records").glob("track_*/*"))) == 2
    records = [line for line in closing_summary(run_dir).splitlines() if line.startswith("  records")]
    assert records == [f"  records     {next((run_dir / 'records').glob('track_*/2026-12-04_*'))}/"]


def test_closing_summary_of_a_partial_report_names_its_files(tmp_path):
    """The `partial` rule writes under results/<run>/partial/: the summary points there, not at the run folder."""
    from report_fixtures import make_cpu_run

    from pgolf.report.summary import closing_summary

    run_dir = make_cpu_run(tmp_path)
    run_report(run_dir, agg_config(date="2026-12-04"), [1, 2, 3], mode="sweep", out_dir=run_dir / "partial",
               make_folder=False)
    text = closing_summary(run_dir)
    partial = run_dir / "partial"
    assert (partial / "report.html").resolve().as_uri() in text and str(partial / "submission.json") in text
    # a full aggregation from before, and then `partial` again: the summary is the newer one's
    run_report(run_dir, agg_config(date="2026-12-04"), [1, 2, 3], mode="sweep")
    assert str(run_dir / "submission.json") in closing_summary(run_dir)
    run_report(run_dir, agg_config(date="2026-12-04"), [1, 2], mode="sweep", out_dir=partial, make_folder=False)
    text = closing_summary(run_dir)
    assert "finished: 2 seeds [1, 2]" in text and str(partial / "submission.json") in text


def test_cli_report_takes_the_runs_comply_json(tmp_path, capsys):
    """``pgolf report`` reads <run-dir>/comply.json by itself (or --comply FILE): the verdicts reach the report."""
    run_dir = make_cpu_run(tmp_path)
    args = ["report", "--run-dir", str(run_dir), "--aggregate-json", json.dumps({"submission_name": "cpu"}),
            "--seeds", *map(str, sorted(CPU_STAGES)), "--mode", "sweep", "--no-folder"]
    assert pgolf_main(args) == 0
    agg = json.loads((run_dir / "aggregate.json").read_text())
    assert agg["compliance"]  # read from the default place
    moved = tmp_path / "elsewhere.json"
    (run_dir / "comply.json").rename(moved)
    assert pgolf_main(args) == 0 and "compliance" not in json.loads((run_dir / "aggregate.json").read_text())
    assert pgolf_main([*args, "--comply", str(moved)]) == 0
    assert json.loads((run_dir / "aggregate.json").read_text())["compliance"] == agg["compliance"]
    assert pgolf_main([*args, "--comply", str(tmp_path / "none.json")]) == 2
    assert "--comply" in capsys.readouterr().err



def test_a_tighter_cap_than_the_rules_is_no_blocker(tmp_path):
    """Record mode allows a recipe to gate against less than 16,000,000 bytes (never more): an artifact that fits
    the tighter cap fits the rules', so the cap itself is no reason against a record."""
    run_dir = make_run(tmp_path / "tight", {42: 1.0500, 0: 1.0510, 1234: 1.0505})
    for seed in SEEDS:
        _edit_json(run_dir / f"seed{seed}" / "pack" / "pack_report.json", cap=15_990_000)
    reasons = run_report(run_dir, agg_config(), SEEDS, make_folder=False)["verdict"]["reasons"]
    assert not any("cap" in reason for reason in reasons), reasons



def test_the_readme_reruns_each_seed_with_its_own_process_count(tmp_path):
    """A run on one CPU process: the folder README's command starts one process (8 would split the batch another
    way, or refuse it, and give another artifact); a record run's seeds ran on 8 (test_submission)."""
    run_dir = make_cpu_run(tmp_path)
    run_report(run_dir, agg_config(date="2026-12-04"), sorted(CPU_STAGES), mode="sweep")
    readme = next((run_dir / "records").glob("track_*/*/README.md")).read_text()
    for seed in CPU_STAGES:
        assert f"torchrun --standalone --nproc_per_node 1 train_gpt.py --seed {seed} --data-dir ./data/" in readme
    assert "--nproc_per_node 8 train_gpt.py" not in readme

def test_the_reproduce_command_keeps_shell_braces_and_needs_the_seed(tmp_path, capsys):
    """``--reproduce-command`` is a shell line: only ``{seed}`` is replaced (``${DATA:-./data}`` stays as written), and
    a line without ``{seed}`` is refused (it would give every seed the same command)."""
    run_dir = make_run(tmp_path)
    command = "DATA=${DATA:-./data} torchrun --standalone --nproc_per_node 8 train_gpt.py --seed {seed} --data-dir $DATA"
    args = ["report", "--run-dir", str(run_dir), "--aggregate-json", json.dumps(PR1787), "--seeds", *map(str, SEEDS),
            "--reproduce-command", command]
    assert pgolf_main(args) == 0
    readme = next((run_dir / "records").glob("track_*/*/README.md")).read_text()
    for seed in SEEDS:
        assert command.replace("{seed}", str(seed)) in readme
    capsys.readouterr()
    assert pgolf_main([*args[:-1], "torchrun train_gpt.py --data-dir ./data/"]) == 2
    assert "expected a command with {seed}" in capsys.readouterr().err
    assert pgolf_main([*args[:-1], "torchrun --nproc_per_node {nproc} train_gpt.py --seed {seed}"]) == 0
    readme = next((run_dir / "records").glob("track_*/*/README.md")).read_text()
    assert all(f"torchrun --nproc_per_node 8 train_gpt.py --seed {seed}" in readme for seed in SEEDS)
