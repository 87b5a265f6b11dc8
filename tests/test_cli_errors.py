"""User mistakes at the command line: one line naming the path and what was expected, exit status 2, no
traceback, and nothing of the user's replaced."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pgolf.cli import main as pgolf_main

REPO = Path(__file__).resolve().parents[1]


def run(argv: list[str], capsys) -> tuple[int, str]:
    code = pgolf_main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err.strip()


def test_a_folder_where_a_file_is_expected(tmp_path: Path, capsys) -> None:
    code, err = run(["pack", "inspect", str(tmp_path)], capsys)
    assert code == 2 and err == f"pgolf: error: [Errno 21] Is a directory: '{tmp_path}'"
    code, err = run(["checkpoint", "import-record", str(tmp_path), "--out", str(tmp_path / "ckpt"),
                     "--config", str(REPO / "config.yaml")], capsys)
    assert code == 2 and f"{tmp_path}: a folder, expected the record script's final_model.pt" in err


def test_a_file_of_another_kind(tmp_path: Path, capsys) -> None:
    text = tmp_path / "train.log"
    text.write_text("not a state dict\n")
    code, err = run(["checkpoint", "import-record", str(text), "--out", str(tmp_path / "ckpt"),
                     "--config", str(REPO / "config.yaml")], capsys)
    assert code == 2 and f"{text}: not a readable state dict" in err and "weights_only=False" not in err
    import torch

    flat = tmp_path / "flat.pt"  # the record's names, other shapes
    torch.save({name: torch.zeros(10) for name in ("qo_bank", "kv_bank", "mlp_up_bank", "mlp_down_bank",
                                                   "tok_emb.weight")}, flat)
    code, err = run(["checkpoint", "import-record", str(flat), "--out", str(tmp_path / "ckpt"),
                     "--config", str(REPO / "config.yaml")], capsys)
    assert code == 2 and f"{flat}: 'tok_emb.weight' has shape [10], expected 2 dimensions" in err
    json_file = tmp_path / "report.json"
    json_file.write_bytes(b"\xff\xfe not text")
    code, err = run(["gate", "--pack-report", str(json_file), "--artifact", str(flat), "--code", str(flat),
                     "--pack-json", "{}", "--out", str(tmp_path / "gate.json")], capsys)
    assert code == 2 and f"{json_file}: pack report is not UTF-8 text, so not JSON" in err
    json_file.write_text("[]")
    code, err = run(["gate", "--pack-report", str(json_file), "--artifact", str(flat), "--code", str(flat),
                     "--pack-json", "{}", "--out", str(tmp_path / "gate.json")], capsys)
    assert code == 2 and f"{json_file}: pack report must be a JSON object, got list" in err
    costs = tmp_path / "costs.json"
    for content, message in (("[1]", "costs JSON must be a JSON object, got list"), ("{", "costs JSON is not valid JSON")):
        costs.write_text(content)
        code, err = run(["eval-plan", "--config", str(REPO / "config.yaml"), "--costs", str(costs)], capsys)
        assert code == 2 and f"{costs}: {message}" in err


def test_comply_on_a_mistyped_run_folder(tmp_path: Path, capsys) -> None:
    code, err = run(["comply", str(tmp_path / "smok"), "--config", str(REPO / "recipes" / "smoke.yaml")], capsys)
    assert code == 2 and err == f"pgolf: error: {tmp_path / 'smok'}: no such run folder"


def test_comply_refuses_the_recipe_of_another_run(tmp_path: Path, capsys, monkeypatch) -> None:
    """`pgolf comply results/smoke` without --config would judge the smoke run by config.yaml (the record's seeds,
    data folder and mode): refused, naming both runs."""
    run_dir = tmp_path / "results" / "smoke"
    run_dir.mkdir(parents=True)
    monkeypatch.chdir(REPO)
    code, err = run(["comply", str(run_dir)], capsys)
    assert code == 2 and err == (f"pgolf: error: {run_dir} holds run 'smoke', but config.yaml is the recipe of run "
                                 "'record': give the run's own recipe with --config")


def test_prepare_never_replaces_a_folder_of_the_users(tmp_path: Path, capsys) -> None:
    """--out naming the documents' own folder (or any non-empty folder that is not earlier shards) is refused
    before tokenizing, and the folder keeps its files."""
    from shard_fixtures import corpus_texts, published_model, write_jsonl

    mine = tmp_path / "mydata"
    mine.mkdir()
    write_jsonl(mine / "docs.jsonl", corpus_texts(20, seed=1))
    (mine / "NOTES.txt").write_text("keep\n")
    code, err = run(["data", "prepare", "--docs", str(mine / "docs.jsonl"), "--tokenizer", str(published_model()),
                     "--out", str(mine), "--val-docs", "5"], capsys)
    assert code == 2 and "not empty and holds no manifest.json" in err
    assert sorted(p.name for p in mine.iterdir()) == ["NOTES.txt", "docs.jsonl"]
    assert json.loads((mine / "docs.jsonl").read_text().splitlines()[0])["text"]


def test_an_output_that_names_an_input_or_another_output_is_refused(tmp_path: Path, capsys) -> None:
    """`--out` equal to the file the command reads (a quantized model replaced by its artifact) or to its other
    output: refused before any work, the input untouched."""
    quantized = tmp_path / "quantized.pt"
    quantized.write_bytes(b"the user's quantized model")
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    code, err = run(["pack", "build", "--quantized", str(quantized), "--checkpoint", str(checkpoint), "--pack-json",
                     "{}", "--out", str(quantized), "--report", str(tmp_path / "report.json")], capsys)
    assert code == 2 and err == f"pgolf: error: --out {quantized} is also --quantized: the command would overwrite its input"
    assert quantized.read_bytes() == b"the user's quantized model"
    same = tmp_path / "same.json"
    code, err = run(["pack", "build", "--quantized", str(quantized), "--checkpoint", str(checkpoint), "--pack-json",
                     "{}", "--out", str(same), "--report", str(same)], capsys)
    assert code == 2 and f"--out {same} is also --report: the command would overwrite another of its outputs" in err


def test_a_word_argument_is_no_input_path(tmp_path: Path, monkeypatch) -> None:
    """`pgolf data download tokenizer --out tokenizer` writes a file named like the word: no overwrite of an input."""
    from pgolf.cli import _word_dests, build_parser, overwrite_problems

    monkeypatch.chdir(tmp_path)
    (tmp_path / "tokenizer").write_text("an earlier download")
    parser = build_parser()
    args = parser.parse_args(["data", "download", "tokenizer", "--config", "r.yaml", "--out", "tokenizer"])
    assert overwrite_problems(args, _word_dests(parser)) == []
    assert overwrite_problems(args) != []  # without knowing the word arguments it would have been refused
