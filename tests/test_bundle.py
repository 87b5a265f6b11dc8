"""The bundled train_gpt.py and the in-process record run.

The end-to-end fixture bundles a tiny recipe, then runs the bundled file under torchrun with 2 CPU processes
from a folder outside the repository, with pgolf made unimportable (:data:`pgolf.artifact.bundle.LAUNCHER`). The staged
stage functions are then run in this process on the record run's own checkpoint: Hessians, quantized tensors,
artifact and score must be the record run's, bit for bit.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pgolf.artifact.bundle import (
    LAUNCHER,
    BundleError,
    build_bundle,
    bundle_report,
    imported_modules,
    isolated_env,
    left_out_modules,
    reachable_modules,
    render_bundle,
    string_literal,
    third_party_imports,
    verify_help,
    write_bundle,
)
from pgolf.config import (
    DataConfig,
    EvaluateConfig,
    HessianConfig,
    ModelConfig,
    PackConfig,
    QuantizeConfig,
    RunConfig,
    TokenizerConfig,
    TrainConfig,
    TTTConfig,
    load_run_config,
    to_dict,
)
from pgolf.data.shards import BOS_ID, write_shard
from pgolf.artifact.minify import count_code_bytes, make_wrapper

VOCAB = 300
SEED = 5
REPO_ROOT = Path(__file__).resolve().parent.parent


def tiny_config(**evaluate) -> RunConfig:
    """Every stage at toy size: 2 layers of width 32 with looping and two lanes, 4 steps, LoRA TTT."""
    ttt = TTTConfig(mode="lora", lora_rank=4, lora_alpha=8.0, chunk_tokens=8, docs_per_batch=3, context_tokens=24,
                    lr=0.05, phase_boundaries_docs=(), phase_chunk_tokens=48, phase_lr=0.05)
    return RunConfig(
        run="tiny",
        mode="sweep",
        seeds=(SEED,),
        data=DataConfig(name="tiny", source="local", docs_path="unused.jsonl", val_docs=40),
        tokenizer=TokenizerConfig(source="path", path="unused.model", vocab_size=VOCAB),
        model=ModelConfig(vocab_size=VOCAB, num_layers=2, model_dim=32, num_heads=4, num_kv_heads=2, rope_dims=4,
                          xsa_last_n=2, attn_gate_window=8, smear_gate_window=8, loop_start=0, loop_end=0,
                          loop_count=2, parallel_residual_start=1),
        train=TrainConfig(train_batch_tokens=512, micro_batch_tokens=128, train_seq_len=48, max_wallclock_seconds=0.0,
                          reserve_seconds=0.0, iterations=4, warmup_steps=1, compile=False,
                          ema_decay=0.5, log_every_steps=1),
        hessians=HessianConfig(batches=2, batch_rows=3, seq_len=32),
        quantize=QuantizeConfig(passthrough_max_elements=1024, lqer_top_k=2, lqer_rank=2, lqer_group_size=16),
        pack=PackConfig(brotli_quality=5, code_bytes_convention="file"),
        evaluate=EvaluateConfig(eval_seq_len=24, eval_batch_tokens=96, compile=False, progress_every_seconds=1e9,
                                ttt=ttt, **evaluate),
    )


def write_data(directory: Path, n_docs: int = 160) -> Path:
    """Val shard + byte sidecar + two train shards of BOS-prefixed documents with ids below VOCAB."""
    rng = np.random.default_rng(0)
    docs = [np.concatenate([[BOS_ID], rng.integers(8, VOCAB, size=int(rng.integers(4, 40)))]) for _ in range(n_docs)]
    val = np.concatenate(docs[:20]).astype(np.uint16)
    train = np.concatenate(docs[20:]).astype(np.uint16)
    directory.mkdir(parents=True, exist_ok=True)
    write_shard(directory / "fineweb_val_000000.bin", val)
    write_shard(directory / "fineweb_val_bytes_000000.bin", np.where(val == BOS_ID, 0, 1 + val % 4).astype(np.uint16))
    write_shard(directory / "fineweb_train_000000.bin", train[: len(train) // 2])
    write_shard(directory / "fineweb_train_000001.bin", train[len(train) // 2 :])
    return directory


def run_hidden(script: Path, args: list[str], cwd: Path, nproc: int = 1, timeout: float = 300):
    """Run ``script`` with pgolf unimportable (the launcher removes it), optionally under torchrun."""
    launcher = cwd / "launch_without_pgolf.py"
    launcher.write_text(LAUNCHER, encoding="utf-8")
    env = isolated_env()
    env["OMP_NUM_THREADS"] = "1"
    if nproc == 1:
        cmd = [sys.executable, "-I", str(launcher), str(script), *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(launcher), str(script), *args]
    return subprocess.run(cmd, cwd=str(cwd), env=env, capture_output=True, text=True, timeout=timeout)


# --------------------------------------------------------------------------------------------- module choice


def test_walk_follows_every_import_form_and_nothing_else(tmp_path: Path) -> None:
    pkg = tmp_path / "pgolf"
    (pkg / "sub").mkdir(parents=True)
    files = {
        "__init__.py": "",
        "record_run.py": "import os\nfrom pgolf import a\n\ndef f():\n    from .sub import b\n    import pgolf.c as c\n",
        "a.py": "from pgolf.sub.b import thing\n",
        "c.py": "try:\n    import pgolf.d\nexcept ImportError:\n    pass\n",
        "d.py": "",
        "unused.py": "import pgolf.a\n",
        "sub/__init__.py": "from . import e\n",
        "sub/b.py": "thing = 1\nfrom .. import io_like\n",
        "sub/e.py": "",
        "io_like.py": "",
    }
    for rel, text in files.items():
        (pkg / rel).write_text(text)
    found = reachable_modules("pgolf.record_run", pkg)
    assert found == ["pgolf", "pgolf.a", "pgolf.c", "pgolf.d", "pgolf.io_like", "pgolf.record_run", "pgolf.sub",
                     "pgolf.sub.b", "pgolf.sub.e"]
    with pytest.raises(BundleError, match="pgolf.missing"):
        reachable_modules("pgolf.missing", pkg)


def test_third_party_split_follows_import_guards() -> None:
    record_run = (
        "import numpy\n"
        "import pgolf.other\n"
        "try:\n    import pgolf.fast\nexcept ImportError:\n    pass\n"
        "def f():\n    import brotli\n"
    )
    sources = {
        "pgolf": (True, ""),
        "pgolf.artifact.record_run": (False, record_run),
        "pgolf.fast": (False, "import triton.language as tl\nimport numpy\n"),
        "pgolf.other": (False, "try:\n    import fa3\nexcept Exception:\n    fa3 = None\nimport os, json\n"),
    }
    assert third_party_imports(sources) == {"required": ["brotli", "numpy"], "optional": ["fa3", "triton"]}


def test_relative_imports_resolve_against_the_package() -> None:
    assert imported_modules("from . import x\nfrom ..y import z\n", "pgolf.data.loader") >= {
        "pgolf.data", "pgolf.data.x", "pgolf.y", "pgolf.y.z"}
    assert "pgolf.data.w" in imported_modules("from .w import v\n", "pgolf.data", is_package=True)


@pytest.fixture(scope="module")
def record_shipped_form():
    """The record recipe's bundle with its modules in the shipped form (seconds of shrinking: built once here)."""
    return build_bundle(load_run_config(REPO_ROOT / "config.yaml"), minify=True)


def test_recipe_switches_decide_what_is_left_out(record_shipped_form) -> None:
    record = load_run_config(REPO_ROOT / "config.yaml")
    assert set(left_out_modules(record)) == {"pgolf.data.tokenizer", "pgolf.data.caseops", "pgolf.evaluate.bigram_hash",
                                             "pgolf.evaluate.lora", "pgolf.evaluate.ttt_graphs"}
    lut = dataclasses.replace(record, evaluate=dataclasses.replace(record.evaluate, byte_accounting="lut"),
                              tokenizer=dataclasses.replace(record.tokenizer, caseops=False))
    bigram = dataclasses.replace(record, evaluate=dataclasses.replace(
        record.evaluate, ttt=dataclasses.replace(record.evaluate.ttt, mode="chunked", bigram_hash_buckets=64)))
    record_ttt = {"pgolf.evaluate.lora", "pgolf.evaluate.ttt_graphs"}
    assert set(left_out_modules(lut)) == {"pgolf.evaluate.bigram_hash"} | record_ttt
    assert set(left_out_modules(bigram)) == {"pgolf.data.tokenizer", "pgolf.data.caseops", *(
        f"pgolf.evaluate.{m}" for m in ("ttt_record", "ttt_plan", "ttt_adapters", "ttt_forward", "ttt_phase",
                                        "ttt_graphs"))}
    no_graphs = dataclasses.replace(record, train=dataclasses.replace(record.train, cuda_graphs=False))
    assert set(left_out_modules(no_graphs)) - set(left_out_modules(record)) == {"pgolf.train.graphs"}
    full = reachable_modules()
    pruned = reachable_modules(left_out=frozenset(left_out_modules(record)))
    assert set(full) - set(pruned) == set(left_out_modules(record))  # nothing else hung on them
    bundle = record_shipped_form
    # the shipped form also drops the modules that its folded switches no longer import (pgolf.artifact.shrink;
    # pgolf.train.resume: train.resume_every_steps is 0, tests/test_shrink.py; pgolf.model.idle_gaps: only the
    # benchmark's profiler reads it)
    # and it embeds one generated pgolf.config module in place of the config package (pgolf.artifact.config_module)
    assert {m.name for m in bundle.modules} == set(pruned) - {"pgolf.evaluate.chunked_ttt", "pgolf.train.prequant_ttt",
                                                              "pgolf.train.resume", "pgolf.config.strict",
                                                              "pgolf.config.training", "pgolf.config.post_training",
                                                              "pgolf.model.idle_gaps"}
    assert [m.is_package for m in bundle.modules if m.name == "pgolf.config"] == [False]
    assert set(bundle.left_out) >= set(left_out_modules(record)) | {"pgolf.evaluate.chunked_ttt"}
    assert "its recipe does not use it" in bundle.text
    assert count_code_bytes(bundle.text, "wrapper") < count_code_bytes(build_bundle(lut, minify=True).text, "wrapper")


def test_attention_kernels_are_shipped_only_by_a_recipe_that_turns_one_on(record_shipped_form) -> None:
    """train.fused_qk_norm_rope / fused_xsa_gate are folded: the record recipe turns both on and ships them; with
    both off nothing imports pgolf.model.attn_kernels and the file has none of it."""
    record = load_run_config(REPO_ROOT / "config.yaml")
    assert record.train.fused_qk_norm_rope and record.train.fused_xsa_gate
    assert {"pgolf.model.attn_kernels", "pgolf.model.attn_triton"} <= {m.name for m in record_shipped_form.modules}
    off = dataclasses.replace(record, train=dataclasses.replace(record.train, fused_qk_norm_rope=False,
                                                                fused_xsa_gate=False))
    text = build_bundle(off, minify=True).text
    assert "attn_triton" not in text and "attn_kernels" not in text


SHIPPED_KERNEL_CHECK = """
import runpy, sys, torch
runpy.run_path(sys.argv[1], run_name="shipped")  # installs the bundle's importer; pgolf is the bundled one now
import pgolf
import pgolf.model.attn_kernels as ak
assert pgolf.__bundle__ and ak.use_triton(torch.zeros(1)), "not the shipped modules under the interpreter"
gen = torch.Generator().manual_seed(0)
x, g = torch.randn(13, 8, 64, generator=gen), torch.randn(13, 8, 64, generator=gen)
angles = torch.arange(13.0)[:, None] * 10000.0 ** (-torch.arange(0, 16, 2) / 16.0)[None, :]  # [T, 8]
cos, sin = angles.cos(), angles.sin()
gain = torch.rand(8, generator=gen) + 0.5
v, z = torch.randn(13, 2, 64, generator=gen), torch.randn(13, 8, generator=gen)  # 26 rows: a masked last program
cases = ((ak.qk_norm_rope, ak.qk_norm_rope_reference, lambda x, gain: (x, cos[:, None], sin[:, None], gain), (x, gain)),
         (ak.xsa_gate, ak.xsa_gate_reference, lambda y, v, z: (y, v, z, 0.5), (x, v, z)))
for fn, ref, arguments, inputs in cases:
    outs = []
    for f in (fn, ref):
        leaves = [a.clone().requires_grad_(True) for a in inputs]
        out = f(*arguments(*leaves))
        outs.append([out] + list(torch.autograd.grad(out, leaves, g)))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
print("shipped kernels ok")
"""


def test_shipped_attention_kernels_match_their_references_under_the_interpreter(record_shipped_form, tmp_path) -> None:
    """The record bundle's own (shrunk, renamed) attention kernels run under Triton's interpreter and give their
    references' outputs and gradients: the shipped form of the Triton code is the code that was tested."""
    pytest.importorskip("triton")
    script = tmp_path / "train_gpt.py"
    script.write_text(record_shipped_form.text)
    env = {**isolated_env(), "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "-c", SHIPPED_KERNEL_CHECK, str(script)], capture_output=True, text=True,
                            cwd=tmp_path, env=env, timeout=300)
    assert result.returncode == 0 and "shipped kernels ok" in result.stdout, result.stderr[-3000:]


def test_a_kernel_switched_off_in_its_module_is_left_out(tmp_path: Path) -> None:
    """The Gluon q, k, v kernel ships while attn_triton.QKV_WARP_SPECIALIZED is True (as committed); the switch is
    read from the module's text (a copy with it off reads False and leaves the module out; one without a literal is
    refused)."""
    from pgolf.artifact.fold import module_switch

    name, path = "QKV_WARP_SPECIALIZED", REPO_ROOT / "pgolf" / "model" / "attn_triton.py"
    source = path.read_text()
    assert f"{name} = True\n" in source and module_switch(path, name)
    assert "pgolf.model.gluon_qkv" not in left_out_modules(load_run_config(REPO_ROOT / "config.yaml"))
    copy = tmp_path / "attn_triton.py"
    copy.write_text(source.replace(f"{name} = True", f"{name} = False"))
    assert not module_switch(copy, name)
    copy.write_text(source.replace(f"{name} = True", f"{name} = 1"))
    with pytest.raises(ValueError, match=f"{name} = True or False"):
        module_switch(copy, name)
    assert "pgolf.model.gluon_qkv" in reachable_modules()  # imported lazily by attn_triton


def test_flash_attention_4_ops_are_left_out_unless_the_recipe_may_use_them() -> None:
    record = load_run_config(REPO_ROOT / "config.yaml")
    assert record.model.attention_backend == "auto" and "pgolf.model.flash4" in reachable_modules()
    for backend, left_out in (("auto", False), ("fa4", False), ("fa3", True), ("torch", True)):
        cfg = dataclasses.replace(record, model=dataclasses.replace(record.model, attention_backend=backend))
        assert ("pgolf.model.flash4" in left_out_modules(cfg)) == left_out, backend
    cfg = dataclasses.replace(record, model=dataclasses.replace(record.model, attention_backend="torch"))
    assert "pgolf.model.flash4" not in reachable_modules(left_out=frozenset(left_out_modules(cfg)))


def test_real_selection_has_the_record_path_and_no_cli_or_hub_code() -> None:
    modules = reachable_modules()
    for needed in ("pgolf", "pgolf.artifact.record_run", "pgolf.train.loop", "pgolf.quantize.hessians", "pgolf.quantize.stage", "pgolf.artifact.pack",
                   "pgolf.evaluate.stage", "pgolf.model.gpt", "pgolf.data", "pgolf.data.loader", "pgolf.compliance.provenance"):
        assert needed in modules
    for excluded in ("pgolf.data.hub", "pgolf.data.prepare", "pgolf.data.cli", "pgolf.cli", "pgolf.artifact.bundle",
                     "pgolf.config.cli", "pgolf.evaluate.cli", "pgolf.__main__"):
        assert excluded not in modules


# ------------------------------------------------------------------------------------------------ rendering


@pytest.mark.parametrize("text", ["plain\n", "has ''' inside", "ends with \\", "cr\r\nlf", "snow \u2603 é", "",
                                  'r"""x"""', "\\'''", "__version__='0.1.0'", "ends with one '", "two ''", 'dq"'])
def test_string_literal_gives_back_the_text(text: str) -> None:
    """Including a source ending in a quote (a minified ``__version__='0.1.0'`` without its newline), which a raw
    triple-quoted literal would close early: ``r'''...''''`` does not compile."""
    literal = string_literal(text)
    assert ast.literal_eval(literal) == text
    assert ast.literal_eval(ast.parse(f"x = {literal}\n").body[0].value) == text


@pytest.fixture(scope="module")
def plain_bundle():
    return build_bundle(tiny_config())


def test_bundle_is_deterministic_and_self_describing(plain_bundle) -> None:
    cfg = tiny_config()
    first, second = plain_bundle, build_bundle(cfg)
    assert first.text == second.text and first.code_hash == second.code_hash
    report = bundle_report(first, minify=False)
    assert report["modules"] == reachable_modules(left_out=frozenset(left_out_modules(cfg)))
    assert report["left_out"] == left_out_modules(cfg)  # the tiny recipe: CaseOps, sidecar bytes, no bigram hash
    assert report["sha256"] == hashlib.sha256(first.text.encode("utf-8")).hexdigest()
    assert report["bytes_file"] == len(first.text.encode("utf-8"))
    assert report["bytes_wrapper"] == len(make_wrapper(first.text).encode("utf-8"))
    assert {"torch", "numpy", "brotli"} <= set(report["third_party"]["required"])
    compile(first.text, "train_gpt.py", "exec")
    assert f"CODE_HASH = {first.code_hash!r}" in first.text
    other = render_bundle(dataclasses.replace(cfg, run="other"), first.modules)
    assert other != first.text and "'other'" in other  # the config changes the file, not the code hash


def test_minified_modules_count_fewer_bytes_and_still_compile(plain_bundle, shipped_form) -> None:
    small = shipped_form(tiny_config())  # build_bundle(tiny_config(), minify=True), shared with the run below
    assert small.code_hash != plain_bundle.code_hash
    assert count_code_bytes(small.text, "wrapper") < count_code_bytes(plain_bundle.text, "wrapper")
    # the shipped form's generated pgolf.config imports no YAML reader: requirements.txt does not ask for one
    assert "yaml" in plain_bundle.third_party["required"] and "yaml" not in small.third_party["required"]
    for m in small.modules:
        compile(m.source, m.name, "exec")


def test_shipped_file_is_byte_identical_under_any_string_hash_seed(tmp_path: Path) -> None:
    """The record recipe's shipped train_gpt.py (its shrunk modules rename names and drop code through sets and
    dicts of strings) is the same file when built by processes with different string-hash seeds, as two machines
    or two Snakemake jobs are: one file, one code hash, one counted figure for every seed of a record. The two
    processes run at once (seconds of shrinking each, on one core each); the table they store in the session's
    cache is what the code identity test below reads for the shipped recipe instead of shrinking it again."""
    procs = {}
    for seed in ("0", "1"):
        out = tmp_path / f"seed{seed}" / "train_gpt.py"
        env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(REPO_ROOT)}
        procs[out] = subprocess.Popen([sys.executable, "-m", "pgolf", "bundle", "--config",
                                       str(REPO_ROOT / "config.yaml"), "--minify-modules", "--no-verify", "--out",
                                       str(out)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    files = []
    for out, proc in procs.items():
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr[-3000:]
        files.append(out.read_bytes())
    assert files[0] == files[1]


def test_code_identity_is_the_bundles_code_hash(record_shipped_form) -> None:
    """What the staged pipeline's pack rule records is the CODE_HASH of the recipe's train_gpt.py."""
    from pgolf.artifact.bundle import code_identity

    record = load_run_config(REPO_ROOT / "config.yaml")
    assert code_identity(record) == record_shipped_form.code_hash
    # the record run's own identity, unbundled: the CODE_HASH of the file the bundle rule writes (shipped recipe)
    from pgolf.artifact.bundle import shipped_recipe
    from pgolf.artifact.record_run import code_identity as run_identity

    three_seeds = dataclasses.replace(record, seeds=(record.seeds[0], 7, 9), data=dataclasses.replace(record.data, workers=5))
    assert run_identity(three_seeds) == code_identity(shipped_recipe(three_seeds)) == code_identity(shipped_recipe(record))
    assert code_identity(tiny_config(), minify=False) == build_bundle(tiny_config()).code_hash


def test_render_refuses_a_bundle_without_the_entry(plain_bundle) -> None:
    modules = [m for m in plain_bundle.modules if m.name != "pgolf.artifact.record_run"]
    with pytest.raises(BundleError, match="pgolf.artifact.record_run"):
        render_bundle(tiny_config(), modules)


def test_cli_writes_the_bundle_and_its_report(tmp_path: Path) -> None:
    out = tmp_path / "records" / "train_gpt.py"
    cfg_json = json.dumps(to_dict(tiny_config()))
    proc = subprocess.run([sys.executable, "-m", "pgolf", "bundle", "--config-json", cfg_json, "--out", str(out),
                           "--no-verify"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.with_name("train_gpt.py.json").read_text())
    assert report["bytes_file"] == out.stat().st_size and f"{report['bytes_file']:,}" in proc.stdout
    assert f"wrapper {report['bytes_wrapper']:,}" in proc.stdout
    bad = subprocess.run([sys.executable, "-m", "pgolf", "bundle", "--config-json", '{"run": "x", "modle": {}}',
                          "--out", str(tmp_path / "bad.py"), "--no-verify"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "modle: unknown key (did you mean 'mode'?)" in bad.stderr
    assert not (tmp_path / "bad.py").exists()


# ----------------------------------------------------------------------------------- running without pgolf


def test_help_runs_without_pgolf_in_file_and_wrapper_form(plain_bundle, tmp_path: Path) -> None:
    text = plain_bundle.text
    help_text = verify_help(text)  # file form and wrapper form, both isolated, same output
    assert "--data-dir" in help_text and "(default: ./data/)" in help_text and f"default: {SEED}" in help_text
    script = tmp_path / "train_gpt.py"
    script.write_text(text)
    proc = run_hidden(script, ["--help"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == help_text
    (tmp_path / "probe.py").write_text("import pgolf\n")
    probe = run_hidden(tmp_path / "probe.py", [], tmp_path)
    assert probe.returncode != 0 and "No module named 'pgolf'" in probe.stderr  # the launcher really hides pgolf


@pytest.fixture(scope="module")
def record_run(tmp_path_factory):
    """The bundled file run from a records folder under torchrun (2 CPU processes) with pgolf hidden."""
    root = tmp_path_factory.mktemp("record")
    data = write_data(root / "data")
    folder = root / "records" / "2026-01-01_Tiny"
    folder.mkdir(parents=True)
    cfg = tiny_config()
    report = write_bundle(cfg, folder / "train_gpt.py", verify=False)
    proc = run_hidden(folder / "train_gpt.py", ["--device", "cpu", "--data-dir", str(data), "--out-dir", "out"],
                      folder, nproc=2)
    return cfg, data, folder, report, proc


def test_record_run_writes_every_stage_output(record_run) -> None:
    cfg, _, folder, report, proc = record_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    out = folder / "out"
    for rel in ("train/checkpoint/checkpoint.json", "train/train_summary.json", "train/metrics.jsonl",
                "hessians/hessians.pt", "hessians/hessian_report.json",
                "quantize/quantize_report.json", "pack/artifact.pgolf", "pack/pack_report.json", "eval/eval.json"):
        assert (out / rel).is_file(), rel
    assert not (out / "quantize/quantized.pt").exists()  # quantize -> pack in memory (pgolf.artifact.record_run)
    summary = json.loads((out / "record_run.json").read_text())
    assert summary["exit_status"] == 0 and summary["world_size"] == 2 and summary["seed"] == SEED
    assert set(summary["stages"]) == {"train", "hessians", "quantize", "pack", "evaluate"}
    assert all(stage["status"] == 0 for stage in summary["stages"].values())
    assert summary["code_hash"] == report["code_hash"]
    meta = json.loads((out / "train/checkpoint/checkpoint.json").read_text())
    assert meta["code_hash"] == report["code_hash"]  # provenance knows it ran from the bundle
    assert meta["world_size"] == 2 and meta["steps"] == cfg.train.iterations
    pack_report = json.loads((out / "pack/pack_report.json").read_text())
    assert pack_report["code_bytes"] == report["bytes_file"]  # the bundle counted itself ("file" convention)
    log = (out / "logs/record_run.log").read_text()
    for stage in ("train", "hessians", "quantize", "pack", "evaluate"):
        assert f"{stage}: done" in log
    assert "val_bpb" in log  # the stages' own output is in the log too


def test_staged_functions_on_the_same_checkpoint_give_identical_results(record_run, tmp_path: Path) -> None:
    from pgolf.evaluate.stage import run_evaluation
    from pgolf.quantize.hessians import load_hessians, run_hessian_stage
    from pgolf.artifact.format import unpack
    from pgolf.artifact.pack import run_pack_stage
    from pgolf.quantize.stage import load_quantized, run_quantize_stage

    cfg, data, folder, report, proc = record_run
    assert proc.returncode == 0, proc.stderr[-5000:]
    out = folder / "out"
    ckpt = out / "train/checkpoint"
    torch.set_num_threads(1)

    _, status = run_hessian_stage(ckpt, data, cfg.hessians, SEED, tmp_path / "h.pt", tmp_path / "h.json", cfg.mode, "cpu")
    assert status == 0
    staged_h, record_h = load_hessians(tmp_path / "h.pt"), load_hessians(out / "hessians/hessians.pt")
    assert staged_h.keys() == record_h.keys()
    assert all(torch.equal(staged_h[k], record_h[k]) for k in staged_h)

    staged_report = run_quantize_stage(ckpt, tmp_path / "h.pt", cfg.quantize, tmp_path / "q.pt", tmp_path / "q.json",
                                       "cpu")
    record_report = json.loads((out / "quantize/quantize_report.json").read_text())
    measured = ("quantize_seconds", "quantized_sha256", "checkpoint")  # the record run writes no quantized.pt
    assert {k: v for k, v in staged_report.items() if k not in measured} == \
        {k: v for k, v in record_report.items() if k not in measured}  # same tensors, errors, provenance
    assert record_report["quantized_sha256"] is None and staged_report["quantized_sha256"]
    staged_q, _ = load_quantized(tmp_path / "q.pt")
    record_q, _ = unpack((out / "pack/artifact.pgolf").read_bytes())  # the record run's quantized model
    assert staged_q.tensors.keys() == record_q.tensors.keys()
    compared = 0
    for name, sq in staged_q.tensors.items():
        rq = record_q.tensors[name]
        assert (sq.method, sq.bits, sq.shape) == (rq.method, rq.bits, rq.shape), name
        for part in ("q", "scale", "data"):
            a, b = getattr(sq, part), getattr(rq, part)
            assert (a is None) == (b is None), f"{name}.{part}"
            if a is not None:
                assert a.dtype == b.dtype and torch.equal(a, b), f"{name}.{part}"
                compared += 1
        assert (sq.lqer is None) == (rq.lqer is None), name
        if sq.lqer is not None:
            for part in ("a_codes", "a_scales", "b_codes", "b_scales"):
                assert torch.equal(getattr(sq.lqer, part), getattr(rq.lqer, part)), f"{name}.lqer.{part}"
    assert compared > 10
    assert any(qt.lqer is not None for qt in record_q.tensors.values())  # LQER ran, and matched

    _, status = run_pack_stage(tmp_path / "q.pt", ckpt, cfg.pack, None, tmp_path / "a.bin",
                               tmp_path / "pack_report.json")
    assert status == 0
    staged_art, record_art = (tmp_path / "a.bin").read_bytes(), (out / "pack/artifact.pgolf").read_bytes()
    _, staged_header = unpack(staged_art)
    _, record_header = unpack(record_art)
    assert staged_header["entries"] == record_header["entries"]  # per-entry sha256 of every stored array
    assert staged_header["quantization"] == record_header["quantization"]
    assert staged_art == record_art  # header included: no path, time or entry point in it (issue 21)

    result, code = run_evaluation(out / "pack/artifact.pgolf", cfg.evaluate, SEED, data, tmp_path / "eval.json",
                                  mode=cfg.mode, device_kind="cpu", pack_report=out / "pack/pack_report.json")
    recorded = json.loads((out / "eval/eval.json").read_text())
    assert code == 0 and result["token_count"] == recorded["token_count"] and result["byte_sum"] == recorded["byte_sum"]
    # Without TTT the score cannot depend on the process count; LoRA TTT's warm-started adapters see a different
    # sequence of document batches per rank, so its figure is compared only loosely.
    staged_plain, record_plain = result["diagnostics"]["post_quant"], recorded["diagnostics"]["post_quant"]
    assert staged_plain["token_count"] == record_plain["token_count"]
    assert staged_plain["val_bpb"] == pytest.approx(record_plain["val_bpb"], rel=1e-9)
    assert result["val_bpb"] == pytest.approx(recorded["val_bpb"], rel=0.01)


def test_record_run_refuses_missing_code_file_and_data(tmp_path: Path) -> None:
    from pgolf.config import ConfigError
    from pgolf.artifact.record_run import run_record

    data = write_data(tmp_path / "data")
    with pytest.raises(ConfigError, match="code_file"):
        run_record(tiny_config(), SEED, data, tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="data directory"):
        run_record(tiny_config(), SEED, tmp_path / "nowhere", tmp_path / "out", stop_after="train")
    assert not (tmp_path / "out").exists()


def test_in_process_record_run_trains_like_the_train_stage_and_stops_at_a_refusal(tmp_path: Path) -> None:
    """One process, unbundled: the record run's checkpoint is the staged train() checkpoint bit for bit, and an
    artifact over the size cap stops the run with the pack stage's status before evaluation."""
    from pgolf.train.checkpoint import load_checkpoint
    from pgolf.artifact.record_run import run_record
    from pgolf.train.loop import train

    torch.set_num_threads(1)
    data = write_data(tmp_path / "data")
    code = tmp_path / "train_gpt.py"
    code.write_text("print('counted code')\n")
    base = tiny_config()
    cfg = dataclasses.replace(base, pack=dataclasses.replace(base.pack, size_cap_bytes=1000))
    summary = run_record(cfg, SEED, data, tmp_path / "rec", code_file=code, device_kind="cpu")
    assert summary["exit_status"] == 3
    assert [summary["stages"][s]["status"] for s in ("train", "hessians", "quantize", "pack")] == [0, 0, 0, 3]
    assert "evaluate" not in summary["stages"] and not (tmp_path / "rec/eval").exists()
    assert not (tmp_path / "rec/pack/artifact.pgolf").exists()
    assert "over the 1,000-byte cap" in json.loads((tmp_path / "rec/pack/pack_report.json").read_text())["message"]
    assert "pack: REFUSED (exit status 3)" in (tmp_path / "rec/logs/record_run.log").read_text()

    train(cfg.model, cfg.optim, cfg.train, SEED, data, tmp_path / "staged", device_kind="cpu")
    record_state, record_meta = load_checkpoint(tmp_path / "rec/train/checkpoint")
    staged_state, staged_meta = load_checkpoint(tmp_path / "staged/checkpoint")
    assert record_state.keys() == staged_state.keys()
    assert all(torch.equal(record_state[k], staged_state[k]) for k in record_state)
    assert record_meta["steps"] == staged_meta["steps"] == cfg.train.iterations


def test_what_the_evaluation_would_refuse_is_refused_before_training(tmp_path: Path) -> None:
    """Bare shards without the byte sidecar: a CaseOps recipe (bytes only from the sidecar), or a plain one with
    no tokenizer for the lookup table, is refused before the training budget is spent."""
    from pgolf.artifact.record_run import run_record
    from pgolf.evaluate.valdata import ValidationDataError

    data = write_data(tmp_path / "data")
    (data / "fineweb_val_bytes_000000.bin").unlink()
    base = tiny_config()
    plain = dataclasses.replace(base, tokenizer=dataclasses.replace(base.tokenizer, caseops=False))
    for cfg, message in ((base, "CaseOps bytes can only come from the sidecar"), (plain, "needs the tokenizer")):
        with pytest.raises(ValidationDataError, match=message):
            run_record(cfg, SEED, data, tmp_path / "out", code_file=__file__, device_kind="cpu")
        assert not (tmp_path / "out").exists()


def test_a_failed_run_says_so_and_leaves_no_earlier_results(tmp_path: Path, monkeypatch) -> None:
    """A stage that raises: the summary and the log say how the run ended, and the files an earlier run left in
    the folder (its score, its summary) are gone, so that no reader takes them for this run's."""
    import pgolf.quantize.stage as quantize_stage
    from pgolf.artifact.record_run import run_record

    torch.set_num_threads(1)
    data = write_data(tmp_path / "data")
    out = tmp_path / "rec"
    for stale in ("eval/eval.json", "record_run.json", "pack/pack_report.json"):
        (out / stale).parent.mkdir(parents=True, exist_ok=True)
        (out / stale).write_text('{"exit_status": 0, "val_bpb": 1.0}')

    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(quantize_stage, "quantize_checkpoint", boom)
    with pytest.raises(RuntimeError, match="boom"):
        run_record(tiny_config(), SEED, data, out, code_file=__file__, device_kind="cpu", stop_after="pack")
    summary = json.loads((out / "record_run.json").read_text())
    assert summary["exit_status"] == 1 and summary["error"] == "RuntimeError: boom"
    assert sorted(summary["stages"]) == ["hessians", "train"]  # quantize raised: no status
    assert "failed: RuntimeError: boom" in (out / "logs/record_run.log").read_text()
    assert not (out / "eval/eval.json").exists() and not (out / "pack/pack_report.json").exists()


def test_main_reports_bad_arguments_without_a_traceback(tmp_path: Path, capsys) -> None:
    from pgolf.artifact.record_run import bundle_main, cli_main as main

    assert main(["--config", str(tmp_path / "nope.yaml"), "--code-file", "x.py"]) == 2
    assert "no such config file" in capsys.readouterr().err
    bundled = to_dict(tiny_config())
    assert main(["--data-dir", str(tmp_path / "nowhere")], run_config=bundled, code_file=__file__) == 2
    assert "data directory not found" in capsys.readouterr().err
    assert bundle_main(bundled, __file__, ["--data-dir", str(tmp_path / "nowhere")]) == 2
    assert "data directory not found" in capsys.readouterr().err
    assert bundle_main(bundled, __file__, ["--device", "cpu", "--quantize-device", "cuda"]) == 2
    assert "a CPU run has no GPU to quantize on" in capsys.readouterr().err
    if not torch.cuda.is_available():
        data = write_data(tmp_path / "data")
        assert bundle_main(bundled, __file__, ["--device", "cuda", "--data-dir", str(data),
                                               "--out-dir", str(tmp_path / "o")]) == 2
        assert "--device cuda: CUDA is not available on this machine" in capsys.readouterr().err
    (tmp_path / "a_file").write_text("x")
    assert bundle_main(bundled, __file__, ["--device", "cpu", "--data-dir", str(write_data(tmp_path / "d2")),
                                           "--out-dir", str(tmp_path / "a_file")]) == 2
    assert "a_file" in capsys.readouterr().err
    bundled["model"]["num_layerz"] = 3
    with pytest.raises(ValueError, match="num_layerz"):
        main([], run_config=bundled, code_file=__file__)


def test_minified_bundle_runs_every_stage(shipped_form, tmp_path: Path) -> None:
    """`--minify-modules` strips docstrings, comments and asserts from every embedded module: the record run must
    still go through train -> hessians -> quantize -> pack -> evaluate with pgolf hidden. The shipped form is the
    session's (tests/conftest.py), written as write_bundle writes it (its text; the CLI test and the staged
    pipeline's bundle rule go through write_bundle itself)."""
    data = write_data(tmp_path / "data")
    folder = tmp_path / "records" / "2026-01-01_TinyMin"
    folder.mkdir(parents=True)
    small = shipped_form(tiny_config())
    assert bundle_report(small, minify=True)["minify_modules"] is True
    (folder / "train_gpt.py").write_bytes(small.text.encode("utf-8"))
    proc = run_hidden(folder / "train_gpt.py", ["--device", "cpu", "--data-dir", str(data), "--out-dir", "out"], folder)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    summary = json.loads((folder / "out" / "record_run.json").read_text())
    assert all(stage["status"] == 0 for stage in summary["stages"].values())
    result = json.loads((folder / "out" / "eval" / "eval.json").read_text())
    assert result["val_bpb"] > 0 and result["token_count"] > 0
    # a refusal in the shipped form is a tag; the line says where its text is (the folder's messages file)
    proc = run_hidden(folder / "train_gpt.py", ["--device", "cpu", "--data-dir", "nowhere"], folder)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and re.fullmatch(
        r"train_gpt\.py: error: [\w.]+:\d+ \(the text of this tag: train_gpt_messages\.json beside the script\)", last), last


def test_renderer_hash_covers_the_writer_modules_only(tmp_path) -> None:
    """The bundle rule's params: the code identity (embedded modules) and the renderer's sources; a change to a
    renderer module changes the hash, a module outside both (a report module) cannot."""
    from pgolf.artifact.bundle import PACKAGE_DIR, RENDERER_FILES, renderer_hash

    for name in RENDERER_FILES + ("report/html.py",):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes((PACKAGE_DIR / name).read_bytes())
    before = renderer_hash(tmp_path)
    assert before == renderer_hash()
    (tmp_path / "report/html.py").write_text("# edited\n")
    assert renderer_hash(tmp_path) == before
    (tmp_path / "artifact/shrink.py").write_bytes((PACKAGE_DIR / "artifact/shrink.py").read_bytes() + b"# edited\n")
    assert renderer_hash(tmp_path) != before
