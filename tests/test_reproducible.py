"""Issue 21, piece by piece: nothing that depends on the entry point, a path, a time or the machine's default
thread count reaches an artifact byte or a counted byte. (tests/test_reproduce.py runs the whole claim: the staged
pipeline and the folder's train_gpt.py give the same artifact.)"""

from __future__ import annotations

import zipfile
from pathlib import Path

import torch

from pgolf.io import sha256_file
from pgolf.train.checkpoint import WEIGHTS_NAME, read_checkpoint_meta, save_checkpoint


def test_checkpoint_bytes_depend_on_the_weights_only(tmp_path: Path) -> None:
    """torch.save to a (temporary, random) path names the zip records after it; the checkpoint saves through
    memory, so the same weights give the same model.pt and weights_sha256 wherever and however often saved."""
    state = {"w": torch.arange(12, dtype=torch.float32).reshape(3, 4), "b": torch.ones(3, dtype=torch.bfloat16)}
    save_checkpoint(tmp_path / "a", state, {"model_config": {}})
    save_checkpoint(tmp_path / "elsewhere" / "b", state, {"model_config": {}})
    a, b = tmp_path / "a" / WEIGHTS_NAME, tmp_path / "elsewhere" / "b" / WEIGHTS_NAME
    assert a.read_bytes() == b.read_bytes()
    assert read_checkpoint_meta(a.parent)["weights_sha256"] == read_checkpoint_meta(b.parent)["weights_sha256"] == sha256_file(a)
    assert {name.split("/")[0] for name in zipfile.ZipFile(a).namelist()} == {"archive"}


def test_cpu_stages_set_their_recipe_thread_count(tmp_path: Path, monkeypatch) -> None:
    """With hessians.cpu_threads the Hessians are summed with the recipe's thread count whatever count the entry
    point left (Snakemake: the rule's threads; train_gpt.py: the cores), so the file is the same. Checked on the
    count the products run with, and on the bytes: where this machine's BLAS sums x.T @ x differently with 1 and 2
    threads (many do; the MKL build of some machines does not), the knob must make 1 thread give the 2-thread file."""
    import dataclasses
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from stage_fixtures import TINY_MODEL, write_shards

    from pgolf.config import HessianConfig, TrainConfig, to_dict
    from pgolf.model.gpt import GPT
    from pgolf.quantize import hessians
    from pgolf.quantize.hessians import run_hessian_stage

    threads_in_products = []
    collect = hessians.collect_hessians

    def observed_collect(*args, **kwargs):
        threads_in_products.append(torch.get_num_threads())
        return collect(*args, **kwargs)

    monkeypatch.setattr(hessians, "collect_hessians", observed_collect)
    data = write_shards(tmp_path / "shards")
    model_cfg = dataclasses.replace(TINY_MODEL, model_dim=64)
    torch.manual_seed(0)
    meta = {"model_config": to_dict(model_cfg), "train_config": to_dict(TrainConfig(max_wallclock_seconds=0.0))}
    save_checkpoint(tmp_path / "ckpt", GPT(model_cfg).state_dict(), meta)
    before = torch.get_num_threads()
    try:
        files = {}
        for knob, threads in ((0, 1), (0, 2), (2, 1)):
            cfg = HessianConfig(batches=2, batch_rows=4, seq_len=256, cpu_threads=knob)
            torch.set_num_threads(threads)
            out = tmp_path / f"h{knob}_{threads}.pt"
            run_hessian_stage(tmp_path / "ckpt", data, cfg, 1, out, tmp_path / "r.json", "sweep", "cpu")
            files[knob, threads] = sha256_file(out)
    finally:
        torch.set_num_threads(before)
    assert threads_in_products == [1, 2, 2]  # knob 0 keeps the caller's count; knob 2 sets 2 though 1 was set
    assert files[2, 1] == files[0, 2]  # whether or not this machine's sums depend on the count


def test_every_cpu_stage_sets_its_threads_itself() -> None:
    """Each stage function (called by its Snakemake job AND by train_gpt.py's record run) sets the thread count
    from its own section, so no entry point can forget to."""
    import inspect

    from pgolf.evaluate.stage import run_evaluation
    from pgolf.quantize.hessians import run_hessian_stage
    from pgolf.quantize.stage import quantize_checkpoint  # under run_quantize_stage and the record run's quantize
    from pgolf.train.loop import train_in_group

    for stage, section in ((train_in_group, "train_cfg"), (run_hessian_stage, "cfg"), (quantize_checkpoint, "cfg"),
                           (run_evaluation, "cfg")):
        assert f"set_cpu_threads({section}.cpu_threads)" in inspect.getsource(stage), stage.__name__


def test_artifact_bytes_do_not_depend_on_the_code_file_or_the_manifest(tmp_path: Path) -> None:
    """The pack stage with the counted file (the bundle's record run) and without it (the staged pipeline, whose
    gate counts it), from checkpoints whose metadata differ in the data manifest hash and the training code hash:
    the same quantized model and code identity give the same artifact bytes. Only the reports differ."""
    import json
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from stage_fixtures import TINY_MODEL

    from pgolf.artifact.pack import run_pack_stage
    from pgolf.config import PackConfig, QuantizeConfig, to_dict
    from pgolf.model.gpt import GPT, build_meta
    from pgolf.quantize.stage import save_quantized
    from pgolf.quantize.weights import quantize_state

    torch.manual_seed(0)
    state = GPT(TINY_MODEL).state_dict()
    code = tmp_path / "train_gpt.py"
    code.write_text("print('counted')\n")
    hessians = {name: torch.eye(t.shape[1]) for name, t in state.items() if t.ndim == 2}
    qm = quantize_state(state, build_meta(TINY_MODEL).param_roles(), hessians,
                        QuantizeConfig(passthrough_max_elements=1024, lqer_mode="off"))
    artifacts, reports = [], []
    for i, (manifest, trained_by, code_file) in enumerate((("a" * 64, "b" * 64, code), ("c" * 64, "d" * 64, None))):
        ckpt = tmp_path / f"ckpt{i}"
        save_checkpoint(ckpt, state, {"model_config": to_dict(TINY_MODEL), "data_manifest_sha256": manifest,
                                      "code_hash": trained_by})
        weights_sha = read_checkpoint_meta(ckpt)["weights_sha256"]
        save_quantized(tmp_path / f"q{i}.pt", qm, {"checkpoint_weights_sha256": weights_sha})
        report, status = run_pack_stage(tmp_path / f"q{i}.pt", ckpt, PackConfig(code_bytes_convention="file"),
                                        code_file, tmp_path / f"a{i}.pgolf", tmp_path / f"r{i}.json", code_id="e" * 64)
        assert status == 0
        artifacts.append((tmp_path / f"a{i}.pgolf").read_bytes())
        reports.append(json.loads((tmp_path / f"r{i}.json").read_text()))
    assert artifacts[0] == artifacts[1]
    assert reports[0]["code_sha256"] == sha256_file(code) and reports[1]["code_sha256"] is None
    assert [r["data_manifest_sha256"] for r in reports] == ["a" * 64, "c" * 64]
    assert [r["training_code_hash"] for r in reports] == ["b" * 64, "d" * 64]
    assert reports[0]["input_hashes"] == reports[1]["input_hashes"]
    assert reports[0]["code_hash"] == "e" * 64 and reports[1]["code_hash"] is None  # with its code file only
