"""submission.json (schema, record fields), the submission folder and `pgolf check-folder`."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from pgolf.cli import main as pgolf_main
from pgolf.config import AggregateConfig, from_mapping
from pgolf.artifact.minify import TAG_MESSAGES_FILE, counted_code, make_wrapper
from pgolf.report.aggregate import run_report
from pgolf.report.folder import check_folder, parse_seed_log
from pgolf.report.submission import third_party_imports
from pgolf.report.schema import SUBMISSION_SCHEMA, schema_text, validate
from report_fixtures import RECORD_BPB, TRAIN_GPT_SOURCE, make_code_bundle, make_run, make_seed

REPO = Path(__file__).resolve().parents[1]
SCHEMA_FILE = REPO / "workflow" / "schemas" / "submission.schema.json"
CFG = {
    "baseline_name": "pr1787",
    "baseline_mean": 1.06335,
    "baseline_n": 3,
    "date": "2026-11-24",
    "submission_name": "Test_Run",
    "author": "A. Golfer",
    "github_id": "agolfer",
    "blurb": "test blurb",
    "technique_summary": "tests",
}
SEEDS = list(RECORD_BPB)
# The fields of the current record's submission.json (rules.md, PR #1855)
RECORD_FIELDS = [
    "author",
    "github_id",
    "name",
    "blurb",
    "date",
    "track",
    "val_loss",
    "val_bpb",
    "val_loss_std",
    "val_bpb_std",
    "seeds",
    "seed_results",
    "comparison_baseline_bpb",
    "delta_vs_leaderboard_bpb",
    "delta_vs_leaderboard_nats",
    "artifact_bytes_mean",
    "artifact_bytes_max",
    "bytes_total",
    "train_steps_mean",
    "step_avg_ms_mean",
    "hardware",
    "pytorch_version",
    "cuda_version",
    "flash_attn_version",
    "technique_summary",
]
SEED_FIELDS = ["val_loss", "val_bpb", "artifact_bytes", "steps", "step_avg_ms", "eval_time_s"]


def cfg(**overrides) -> AggregateConfig:
    return from_mapping(AggregateConfig, {**CFG, **overrides}, "aggregate")


@pytest.fixture
def folder(tmp_path) -> Path:
    run_dir = make_run(tmp_path)
    agg = run_report(run_dir, cfg(), SEEDS, recipe="config.yaml", comply_path=run_dir / "comply.json")
    return Path(agg["submission_folder"])


def test_schema_file_is_current():
    assert SCHEMA_FILE.read_text() == schema_text(), "regenerate: python -m pgolf submission-schema > " + str(
        SCHEMA_FILE
    )


def test_submission_json_validates_and_has_every_record_field(folder):
    jsonschema = pytest.importorskip("jsonschema")
    sub = json.loads((folder / "submission.json").read_text())
    jsonschema.Draft202012Validator(SUBMISSION_SCHEMA).validate(sub)
    assert validate(sub, SUBMISSION_SCHEMA) == []
    missing = [f for f in RECORD_FIELDS if f not in sub]
    assert not missing
    assert sub["track"] == "10min_16mb" and sub["std_kind"] == "sample (ddof=1)"
    assert sub["seeds"] == SEEDS and sorted(sub["seed_results"]) == sorted(str(s) for s in SEEDS)
    for seed, result in sub["seed_results"].items():
        assert all(f in result for f in SEED_FIELDS)
        assert result["val_bpb"] == RECORD_BPB[int(seed)]
    assert sub["comparison_baseline_bpb"] == pytest.approx(1.06335)
    assert sub["delta_vs_leaderboard_bpb"] == pytest.approx(sum(RECORD_BPB.values()) / 3 - 1.06335)
    assert sub["hardware"] == "8xNVIDIA H100 80GB HBM3" and sub["pytorch_version"] == "2.11.0+cu130"
    for key in (
        "code_hash",
        "data_manifest_sha256",
        "config_sha256",
        "environment",
        "hardware",
        "code_bytes_convention",
    ):
        assert key in sub["provenance"]
    assert sub["provenance"]["train_gpt_sha256"] == parse_seed_log(folder / "train_seed42.log")["train_gpt_sha256"]
    assert sub["significance"]["tested"] and "p_value" in sub["significance"]
    assert sub["author"] == "A. Golfer" and sub["date"] == "2026-11-24"
    assert folder.name == "2026-11-24_Test_Run" and folder.parent.name == "track_10min_16mb"
    assert json.loads((folder.parents[2] / "submission.json").read_text()) == sub


def test_own_validator_agrees_with_jsonschema(folder):
    jsonschema = pytest.importorskip("jsonschema")
    good = json.loads((folder / "submission.json").read_text())
    broken = []
    for mutate in (
        lambda d: d.pop("val_bpb"),
        lambda d: d.update(val_bpb="1.06"),
        lambda d: d.update(date="24/11/2026"),
        lambda d: d.update(track="16mb"),
        lambda d: d.update(surprise=1),
        lambda d: d["seed_results"]["42"].pop("steps"),
        lambda d: d["seed_results"].update(abc={}),
        lambda d: d["provenance"].update(code_hash="xyz"),
        lambda d: d["significance"].update(tested="yes"),
        lambda d: d.update(artifact_bytes_max=-1),
    ):
        doc = copy.deepcopy(good)
        mutate(doc)
        broken.append(doc)
    validator = jsonschema.Draft202012Validator(SUBMISSION_SCHEMA)
    for doc in broken:
        ours = validate(doc, SUBMISSION_SCHEMA)
        theirs = list(validator.iter_errors(doc))
        assert ours and theirs, doc


def test_folder_contents(folder):
    names = sorted(p.name for p in folder.iterdir())
    assert names == [
        "README.md",
        "requirements.txt",
        "submission.json",
        "train_gpt.py",
        "train_seed0.log",
        "train_seed1234.log",
        "train_seed42.log",
    ]
    readme = (folder / "README.md").read_text()
    assert "torchrun --standalone --nproc_per_node 8 train_gpt.py --seed 1234 --data-dir ./data/" in readme
    assert "snakemake --cores all --configfile config.yaml" in readme
    assert "| 42 | " in readme and "sample std (ddof=1)" in readme and "population std (ddof=0)" in readme
    log = (folder / "train_seed42.log").read_text()
    assert "===== logs/train.log =====" in log and "===== logs/eval.log =====" in log
    assert parse_seed_log(folder / "train_seed42.log")["val_bpb"] == RECORD_BPB[42]
    requirements = (folder / "requirements.txt").read_text()
    assert "torch==2.11.0  # import torch" in requirements  # the run's torch, without the local +cu130 tag
    assert "numpy==2.5.2  # import numpy" in requirements
    assert "brotli==1.1.0  # import brotli" in requirements  # the run's compressor, not the report machine's


def test_the_folder_carries_the_error_tags_of_a_shipped_bundle(tmp_path):
    """A shipped-form train_gpt.py raises errors as tags; the folder gives a reviewer their texts beside it (not
    code: the script never reads the file), and its README says what the file is."""
    run_dir = make_run(tmp_path)
    meta_path = run_dir / "code" / "train_gpt.py.json"
    messages = {"pgolf.data.loader:88": "f'{path}: no shards'", "pgolf.train.loop:41": "'bad step'"}
    meta_path.write_text(json.dumps({**json.loads(meta_path.read_text()), "messages": messages}))
    agg = run_report(run_dir, cfg(), SEEDS, recipe="config.yaml", comply_path=run_dir / "comply.json")
    folder = Path(agg["submission_folder"])
    assert json.loads((folder / TAG_MESSAGES_FILE).read_text()) == messages
    assert f"`{TAG_MESSAGES_FILE}`: the text of each error tag" in (folder / "README.md").read_text()
    assert check_folder(folder) == []


def test_check_folder_passes_on_a_good_folder(folder, capsys):
    assert check_folder(folder) == []
    assert pgolf_main(["check-folder", str(folder)]) == 0
    assert "OK" in capsys.readouterr().out


def test_check_folder_catches_a_changed_train_gpt(folder, capsys):
    code = folder / "train_gpt.py"
    code.write_text(code.read_text() + "\n# tuned after the runs\n")
    problems = check_folder(folder)
    assert len([p for p in problems if "records train_gpt.py sha256" in p]) == 3  # one per seed log
    out = folder.parent / "check.json"
    assert pgolf_main(["check-folder", str(folder), "--json-out", str(out)]) == 1
    assert "records train_gpt.py sha256" in capsys.readouterr().err
    assert json.loads(out.read_text())["ok"] is False


def test_check_folder_catches_json_that_disagrees_with_the_logs(folder):
    path = folder / "submission.json"
    sub = json.loads(path.read_text())
    sub["seed_results"]["0"]["val_bpb"] = 1.05
    sub["val_bpb"] = sub["val_bpb"] - 0.001
    sub["artifact_bytes_max"] = 15_000_000
    path.write_text(json.dumps(sub))
    problems = "\n".join(check_folder(folder))
    assert "seed_results.0.val_bpb = 1.05, but train_seed0.log says 1.06125" in problems
    assert "val_bpb = " in problems and "but the seed logs give" in problems
    assert "artifact_bytes_max = 15000000, but the seed logs give 15900000" in problems



def test_check_folder_holds_the_text_a_reader_sees_to_the_logged_figures(folder):
    """A log's header and evaluation summary, and the README's headline and results table, are rendered again from
    the summary lines: editing the text a reader sees while keeping the machine-readable line is refused."""
    assert check_folder(folder) == []
    log = folder / "train_seed42.log"
    good_log, good_readme = log.read_text(), (folder / "README.md").read_text()
    summary = parse_seed_log(log)
    shown = f"val_bpb {summary['val_bpb']:.8f}"
    sha_line = f"train_gpt.py sha256: {summary['train_gpt_sha256']}"
    for edited in (good_log.replace(shown, "val_bpb 0.90000000"),
                   good_log.replace(sha_line, "train_gpt.py sha256: " + "0" * 64),
                   good_log.replace("===== evaluation summary", "===== summary")):
        log.write_text(edited)
        problems = "\n".join(check_folder(folder))
        assert "train_seed42.log: " in problems and ("evaluation summary" in problems or "header" in problems), problems
    log.write_text(good_log)
    sub = json.loads((folder / "submission.json").read_text())
    mean_line = f"**val_bpb {sub['val_bpb']:.8f}**"
    row = f"| 42 | {summary['val_loss']:.8f} | {summary['val_bpb']:.8f} |"
    assert mean_line in good_readme and row in good_readme
    for edited, message in ((good_readme.replace(mean_line, "**val_bpb 0.90000000**"), "no headline"),
                            (good_readme.replace(row, "| 42 | 2.00000000 | 0.90000000 |"), "no results row")):
        (folder / "README.md").write_text(edited)
        assert any(message in p for p in check_folder(folder)), message
    (folder / "README.md").write_text(good_readme)
    assert check_folder(folder) == []

def test_check_folder_size_gate_compile_and_missing_files(tmp_path):
    run_dir = tmp_path / "results" / "r"
    sha = make_code_bundle(run_dir)
    for seed, bpb in RECORD_BPB.items():
        make_seed(run_dir, seed, bpb, code_sha256=sha, total_bytes=16_000_001 if seed == 0 else 15_900_000)
    folder = Path(run_report(run_dir, cfg(), SEEDS)["submission_folder"])
    problems = "\n".join(check_folder(folder))
    assert "train_seed0.log: artifact 16000001 bytes is over the 16,000,000-byte cap" in problems
    assert "seed 0 artifact 16,000,001 bytes is over the 16,000,000-byte cap" in problems
    (folder / "train_gpt.py").write_text("def broken(:\n")
    (folder / "requirements.txt").unlink()
    problems = "\n".join(check_folder(folder))
    assert "train_gpt.py: does not compile" in problems
    assert "requirements.txt: required file missing" in problems


def test_check_folder_wants_every_import_in_requirements(folder):
    (folder / "requirements.txt").write_text("torch==2.11.0  # import torch\n")
    problems = "\n".join(check_folder(folder))
    assert "imports 'numpy', which requirements.txt does not list" in problems
    assert "imports 'brotli'" in problems
    # a comment line, or a requirement tagged with another module, installs nothing for the import
    (folder / "requirements.txt").write_text("# import brotli\n# numpy: no known distribution  # import numpy\n"
                                             "torchvision  # import torchvision\n")
    problems = "\n".join(check_folder(folder))
    assert all(f"imports '{m}', which" in problems for m in ("brotli", "numpy", "torch"))


def test_imports_found_inside_a_self_extracting_wrapper():
    wrapped = make_wrapper(TRAIN_GPT_SOURCE)
    assert third_party_imports(wrapped) == ["brotli", "numpy", "torch"]
    bundle_like = 'MODULES = {"pgolf.x": (False, ' + repr("import triton\nimport pgolf.y\n" + "x = 1\n" * 20) + ")}\n"
    assert third_party_imports(bundle_like) == ["triton"]


def test_check_folder_recomputes_what_the_logs_determine(tmp_path):
    """Hand-edited figures of submission.json that the seed logs (and the baseline it names) determine are refused:
    population stds, code bytes, steps, step time, the delta to the baseline, model + code = artifact bytes."""
    run_dir = make_run(tmp_path)
    folder = Path(run_report(run_dir, cfg(baseline_mean=1.0700), SEEDS, comply_path=run_dir / "comply.json")["submission_folder"])
    assert check_folder(folder) == []
    sub_path = folder / "submission.json"
    sub = json.loads(sub_path.read_text())
    edits = {"val_bpb_std_population": 0.5, "bytes_code": 1, "train_steps_mean": 9999.0, "step_avg_ms_mean": 1.0,
             "delta_vs_leaderboard_bpb": -0.05}
    sub.update(edits)
    sub["seed_results"]["42"]["model_bytes"] += 1
    sub_path.write_text(json.dumps(sub))
    problems = "\n".join(check_folder(folder))
    for key in edits:
        assert f"{key} = " in problems, key
    assert "seed_results.42.model_bytes" in problems and "seed_results.42.artifact_bytes is not its model_bytes" in problems


def test_check_folder_recomputes_the_test_and_holds_the_verdict_to_it(folder):
    """The verdict, the significance block and the nats delta follow from the logs' losses and the baseline the
    block states: a folder edited into a record is refused (the fixture is a progression: p ~ 0.036 against
    PR #1787, an improvement just under 0.005 nats)."""
    assert check_folder(folder) == []
    sub_path = folder / "submission.json"
    sub = json.loads(sub_path.read_text())
    assert sub["verdict"]["status"] == "progression"
    sub["verdict"]["status"] = "record"
    sub["significance"].update(p_value=0.001, readme_pass=True)
    sub["delta_vs_leaderboard_nats"] = -0.05
    sub_path.write_text(json.dumps(sub))
    problems = "\n".join(check_folder(folder))
    for expected in ("significance.p_value = 0.001, but the seed logs give", "significance.readme_pass = True",
                     "delta_vs_leaderboard_nats = -0.05, but the seed logs give",
                     "verdict.status = 'record', but the recomputed test allows at most 'progression'"):
        assert expected in problems, expected
    # a moved baseline moves both its bpb figure and the test: the stated baseline must be the tested one
    sub = json.loads(sub_path.read_text())
    sub["comparison_baseline_bpb"] = 1.0810
    sub_path.write_text(json.dumps(sub))
    assert "comparison_baseline_bpb = 1.081, but the tested baseline is" in "\n".join(check_folder(folder))


def test_check_folder_wants_each_log_under_its_own_seeds_name(folder):
    (folder / "train_seed0.log").rename(folder / "swap.log")
    (folder / "train_seed42.log").rename(folder / "train_seed0.log")
    (folder / "swap.log").rename(folder / "train_seed42.log")
    problems = "\n".join(check_folder(folder))
    assert "train_seed0.log: its summary line is seed 42's, not seed 0's" in problems
    assert "train_seed42.log: its summary line is seed 0's, not seed 42's" in problems


def test_check_folder_accepts_the_optional_imports_it_writes(tmp_path):
    """A guarded import (FlashAttention: no wheel to pin) is the requirements.txt comment line that
    requirements_text writes for it, and check-folder takes that line as accounting for the import."""
    run_dir = tmp_path / "results" / "record"
    source = TRAIN_GPT_SOURCE + "try:\n    import flash_attn_interface\nexcept ImportError:\n    pass\n"
    counted = counted_code(source.encode(), "wrapper")[0]
    sha = make_code_bundle(run_dir, source=source, bytes_wrapper=counted)
    meta_path = run_dir / "code" / "train_gpt.py.json"
    meta = json.loads(meta_path.read_text())
    meta["third_party"] = {"required": ["brotli", "numpy", "torch"], "optional": ["flash_attn_interface"]}
    meta_path.write_text(json.dumps(meta))
    for seed, bpb in RECORD_BPB.items():
        make_seed(run_dir, seed, bpb, code_sha256=sha, code_bytes=counted)
    folder = Path(run_report(run_dir, cfg(), SEEDS)["submission_folder"])
    assert "# optional (used when importable): flash_attn_interface  # import flash_attn_interface" in (
        folder / "requirements.txt").read_text()
    assert check_folder(folder) == []


def test_code_bytes_of_no_counted_convention_are_refused(tmp_path):
    """Code bytes are checked by counting the folder's file under the stated convention; a convention pgolf does
    not count would let any figure through."""
    run_dir = make_run(tmp_path)
    folder = Path(run_report(run_dir, cfg(baseline_mean=1.0700), SEEDS, comply_path=run_dir / "comply.json")["submission_folder"])
    sub_path = folder / "submission.json"
    sub = json.loads(sub_path.read_text())
    sub["provenance"]["code_bytes_convention"] = "raw"
    sub_path.write_text(json.dumps(sub))
    assert any("code_bytes_convention" in p for p in check_folder(folder))
    for seed in SEEDS:
        pack = run_dir / f"seed{seed}" / "pack" / "pack_report.json"
        pack.write_text(json.dumps({**json.loads(pack.read_text()), "code_bytes_convention": "raw"}))
    with pytest.raises(Exception, match="code_bytes_convention"):  # submission.json's schema refuses it
        run_report(run_dir, cfg(baseline_mean=1.0700), SEEDS, comply_path=run_dir / "comply.json")


def test_code_bundle_cross_checks(tmp_path):
    """The folder's train_gpt.py must reproduce the claims: an artifact naming other code, a size gate that counted
    another file or another count each block a record; when all agree the README says the script reproduces them."""
    run_dir = make_run(tmp_path / "good")
    agg = run_report(run_dir, cfg(baseline_mean=1.0700), SEEDS, comply_path=run_dir / "comply.json")
    assert agg["verdict"]["status"] == "record"
    readme = (Path(agg["submission_folder"]) / "README.md").read_text()
    assert "the folder's train_gpt.py reproduces these claims" in readme and "32,000 (wrapper)" in readme
    assert check_folder(Path(agg["submission_folder"])) == []

    run_dir = make_run(tmp_path / "other_file")
    make_seed(run_dir, 0, RECORD_BPB[0], code_sha256="9" * 64)
    agg = run_report(run_dir, cfg(baseline_mean=1.0700), SEEDS, comply_path=run_dir / "comply.json")
    assert agg["verdict"]["status"] == "non-record"
    assert any("size gate counted a code file with sha256 999999999999" in r for r in agg["verdict"]["reasons"])
    assert not any("reproduces these claims" in n for n in agg["provenance"]["notes"])

    run_dir = make_run(tmp_path / "other_code")
    make_code_bundle(run_dir, code_hash="b" * 64)  # the seeds were gated with code c..., the folder's script is b...
    agg = run_report(run_dir, cfg(baseline_mean=1.0700), SEEDS, comply_path=run_dir / "comply.json")
    assert agg["verdict"]["status"] == "non-record"
    assert any("seed 42: its size gate paired the artifact with code cccccccccccc..., not this train_gpt.py's "
               "CODE_HASH bbbbbbbbbbbb"
               in r for r in agg["verdict"]["reasons"])

    run_dir = make_run(tmp_path / "other_count")
    make_seed(run_dir, 0, RECORD_BPB[0], code_sha256=make_code_bundle(run_dir), code_bytes=31_000)
    agg = run_report(run_dir, cfg(baseline_mean=1.0700), SEEDS, comply_path=run_dir / "comply.json")
    assert any("seed 0: pack report counts 31,000 code bytes (wrapper), train_gpt.py counts 32,000" in r
               for r in agg["verdict"]["reasons"])
    problems = "\n".join(check_folder(Path(agg["submission_folder"])))
    assert "seed_results.0.code_bytes = 31000, but train_gpt.py counts 32,000 bytes (wrapper)" in problems


def test_missing_bundle_is_a_clear_error(tmp_path):
    run_dir = make_run(tmp_path)
    (run_dir / "code" / "train_gpt.py").unlink()
    with pytest.raises(FileNotFoundError, match="bundled train_gpt.py not found .*--no-folder"):
        run_report(run_dir, cfg(), SEEDS, comply_path=run_dir / "comply.json")
    agg = run_report(run_dir, cfg(), SEEDS, make_folder=False, comply_path=run_dir / "comply.json")
    assert "submission_folder" not in agg and (run_dir / "submission.json").exists()
