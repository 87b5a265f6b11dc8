"""Training resume (train.resume_every_steps): an interrupted sweep resumes from its last saved state and ends
with the same weights, bit for bit, as an uninterrupted run; a run without saved state (a record run) starts over
and says so; a state saved by another configuration is not used."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from stage_fixtures import TINY_MODEL, TINY_TRAIN, write_shards

import pgolf.train.storage as storage
from pgolf.config import OptimConfig
from pgolf.train.checkpoint import load_checkpoint
from pgolf.train.loop import ATTEMPT_NAME, RESUME_DIR, train
from pgolf.train.resume import META_NAME

BASE = dataclasses.replace(TINY_TRAIN, iterations=6, warmup_steps=1, loop_enable_fraction=0.5)
# every record choice of the loop that keeps state across steps: bf16 storage, bf16 Muon momentum, the record's
# warm-up restore (Muon momentum survives it) and data stream
RECORD_TRAIN = dataclasses.replace(
    BASE, param_storage="record", warmup_restore="record", data_stream="record", micro_batch_order="interleaved",
    cu_seqlens_pad="multiple_of_64", clip_scope="per_rank", warmup_cu_passes=1,
)
RECORD_OPTIM = OptimConfig(muon_precision="record_bf16", adam_fused="always", muon_momentum_warmup_steps=3)
VARIANTS = {"pgolf": (BASE, OptimConfig(muon_momentum_warmup_steps=3)), "record": (RECORD_TRAIN, RECORD_OPTIM)}


class Interrupt(KeyboardInterrupt):
    pass


def stop_after_updates(monkeypatch, count: int) -> None:
    """Ctrl-C during the step after ``count`` EMA updates (one per step)."""
    real = storage.EMA.update
    calls = {"n": 0}

    def update(self):
        calls["n"] += 1
        if calls["n"] > count:
            raise Interrupt
        real(self)

    monkeypatch.setattr(storage.EMA, "update", update)


def run(data: Path, out: Path, train_cfg, optim_cfg) -> dict:
    return train(TINY_MODEL, optim_cfg, train_cfg, 5, data, out, "cpu")


def steps_and_losses(out: Path) -> list[tuple[int, float]]:
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in lines if r["event"] == "train_step"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_shards(tmp_path_factory.mktemp("resume") / "shards")


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_resumed_sweep_is_bit_identical(variant: str, data: Path, tmp_path: Path, monkeypatch) -> None:
    train_cfg, optim_cfg = VARIANTS[variant]
    saving = dataclasses.replace(train_cfg, resume_every_steps=2)
    run(data, tmp_path / "whole", saving, optim_cfg)  # saving, never interrupted
    if variant == "pgolf":  # saving changes nothing either (one variant is enough: the CPU here is scarce)
        run(data, tmp_path / "plain", train_cfg, optim_cfg)

    out = tmp_path / "resumed"
    with monkeypatch.context() as patch:
        stop_after_updates(patch, 5)  # interrupted in step 6; the state of step 4 is on disk
        with pytest.raises(Interrupt):
            run(data, out, saving, optim_cfg)
    assert not (out / "metrics.jsonl").exists() and (out / ".metrics.jsonl.partial").exists()
    assert json.loads((out / RESUME_DIR / META_NAME).read_text())["step"] == 4
    summary = run(data, out, saving, optim_cfg)
    assert summary["resumed_from_step"] == 4 and summary["earlier_attempts"] == 1

    whole, resumed = (load_checkpoint(d / "checkpoint")[0] for d in (tmp_path / "whole", out))
    for name, tensor in whole.items():
        assert torch.equal(resumed[name], tensor), name
    # the same bytes: the checkpoint holds no measurement and no trace of the interruption
    for name in ("model.pt", "checkpoint.json"):
        assert (out / "checkpoint" / name).read_bytes() == (tmp_path / "whole" / "checkpoint" / name).read_bytes()
    if variant == "pgolf":
        plain = (tmp_path / "plain" / "checkpoint" / "model.pt").read_bytes()
        assert (out / "checkpoint" / "model.pt").read_bytes() == plain
    # the log holds every step once, with the uninterrupted losses, and says where it resumed
    assert steps_and_losses(out) == steps_and_losses(tmp_path / "whole")
    events = [json.loads(line)["event"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert events.count("resumed") == 1 and events[-1] == "train_done"
    assert not (out / RESUME_DIR).exists() and not (out / ".metrics.jsonl.partial").exists()


def test_without_saved_state_a_run_starts_over_and_says_so(data: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    """A record run (resume_every_steps 0) is one uninterrupted timed run: interrupted, it restarts from step 0."""
    out = tmp_path / "record"
    with monkeypatch.context() as patch:
        stop_after_updates(patch, 3)
        with pytest.raises(Interrupt):
            run(data, out, BASE, OptimConfig())
    assert (out / RESUME_DIR / ATTEMPT_NAME).exists() and not (out / RESUME_DIR / META_NAME).exists()
    capsys.readouterr()
    summary = run(data, out, BASE, OptimConfig())
    err = capsys.readouterr().err
    assert "did not finish; this one starts over from step 0" in err and "a record run is one uninterrupted" in err
    assert summary["resumed_from_step"] is None and summary["earlier_attempts"] == 1 and summary["steps"] == 6
    assert [s for s, _ in steps_and_losses(out)] == [1, 2, 3, 4, 5, 6]


def test_a_state_of_another_configuration_is_not_resumed(data: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    saving = dataclasses.replace(BASE, resume_every_steps=2)
    out = tmp_path / "changed"
    with monkeypatch.context() as patch:
        stop_after_updates(patch, 3)
        with pytest.raises(Interrupt):
            run(data, out, saving, OptimConfig())
    capsys.readouterr()
    summary = run(data, out, dataclasses.replace(saving, grad_clip_norm=0.5), OptimConfig())
    assert "saved by another configuration" in capsys.readouterr().err
    assert summary["resumed_from_step"] is None and summary["earlier_attempts"] == 1


def test_a_crash_between_a_state_and_its_json_resumes_from_the_previous_state(data: Path, tmp_path: Path,
                                                                                 monkeypatch) -> None:
    """The process dies after step 4's state file is written, before its state.json: the run resumes from step
    2 (whose pair is intact), not from scratch, and ends with the uninterrupted weights."""
    import pgolf.train.resume as resume

    train_cfg, optim_cfg = VARIANTS["pgolf"]
    saving = dataclasses.replace(train_cfg, resume_every_steps=2)
    run(data, tmp_path / "whole", saving, optim_cfg)
    out = tmp_path / "cut"
    real = resume.atomic_write_json

    def dies_at_step_4(path, obj, *args, **kwargs):
        if obj.get("step") == 4:
            raise Interrupt
        return real(path, obj, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(resume, "atomic_write_json", dies_at_step_4)
        with pytest.raises(Interrupt):
            run(data, out, saving, optim_cfg)
    saved = out / RESUME_DIR
    assert json.loads((saved / META_NAME).read_text())["step"] == 2
    assert sorted(p.name for p in saved.glob("state-*.pt")) == ["state-00000002.pt", "state-00000004.pt"]
    summary = run(data, out, saving, optim_cfg)
    assert summary["resumed_from_step"] == 2
    assert (out / "checkpoint" / "model.pt").read_bytes() == (tmp_path / "whole" / "checkpoint" / "model.pt").read_bytes()


def test_a_job_killed_after_its_outputs_were_written_resumes_at_the_end(data: Path, tmp_path: Path) -> None:
    """The Snakemake rule trains with keep_resume and removes resume/ only after the job succeeded. A job killed in
    between (its processes exiting, say) has its outputs deleted as incomplete; run again, it resumes from the last
    step's state instead of training from step 0, and writes the same bytes."""
    train_cfg, optim_cfg = VARIANTS["pgolf"]
    saving = dataclasses.replace(train_cfg, resume_every_steps=4)  # 6 steps: the last is no multiple of 4
    run(data, tmp_path / "whole", saving, optim_cfg)
    out = tmp_path / "killed"
    train(TINY_MODEL, optim_cfg, saving, 5, data, out, "cpu", keep_resume=True)
    assert json.loads((out / RESUME_DIR / META_NAME).read_text())["step"] == saving.iterations
    assert sorted(p.name for p in (out / RESUME_DIR).glob("state-*.pt")) == ["state-00000006.pt"]
    for name in ("checkpoint", "train_summary.json", "metrics.jsonl"):  # Snakemake: incomplete outputs go
        path = out / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    summary = train(TINY_MODEL, optim_cfg, saving, 5, data, out, "cpu", keep_resume=True)
    assert summary["resumed_from_step"] == saving.iterations and summary["earlier_attempts"] == 1
    for name in ("model.pt", "checkpoint.json"):
        assert (out / "checkpoint" / name).read_bytes() == (tmp_path / "whole" / "checkpoint" / name).read_bytes()
    assert steps_and_losses(out) == steps_and_losses(tmp_path / "whole")
    assert (out / RESUME_DIR).exists()  # the caller's to remove


def test_a_failed_save_at_the_last_step_is_made_good_at_the_end(data: Path, tmp_path: Path, monkeypatch) -> None:
    """A timed sweep stops after a step whose periodic save failed (a full disk for a moment): the last step's
    state is saved at the end all the same, so a job killed before its outputs are accepted resumes there."""
    import pgolf.train.loop as loop
    import pgolf.train.resume as resume

    reads = {"n": 0}

    def clock() -> float:  # one second per read: the 12 s budget ends after a few steps
        reads["n"] += 1
        return float(reads["n"])

    real, tried = resume.save, set()

    def save(resume_dir, state, state_id, step, lines):
        if step >= 2 and step not in tried:  # each step's first save fails
            tried.add(step)
            raise OSError(28, "No space left on device")
        return real(resume_dir, state, state_id, step, lines)

    monkeypatch.setitem(loop.train_model.__kwdefaults__, "clock", clock)
    monkeypatch.setattr(resume, "save", save)
    timed = dataclasses.replace(BASE, resume_every_steps=1, iterations=1000, max_wallclock_seconds=12.0,
                                reserve_seconds=0.0)
    out = tmp_path / "timed"
    summary = train(TINY_MODEL, OptimConfig(muon_momentum_warmup_steps=3), timed, 5, data, out, "cpu",
                    keep_resume=True)
    assert 2 <= summary["steps"] < timed.iterations
    assert json.loads((out / RESUME_DIR / META_NAME).read_text())["step"] == summary["steps"]


def test_a_second_training_of_the_same_folder_is_refused(data: Path, tmp_path: Path) -> None:
    """A training still running in a seed folder (orphaned by a killed Snakemake, say) holds its lock: a rerun into
    that folder is refused at once instead of mixing its files with the orphan's."""
    from pgolf.io import exclusive_lock
    from pgolf.train.loop import TRAIN_LOCK_NAME

    out = tmp_path / "seed"
    with exclusive_lock(out / TRAIN_LOCK_NAME, "the other training"):
        with pytest.raises(FileExistsError, match="a training of this seed is already running"):
            run(data, out, BASE, OptimConfig())
    assert sorted(p.name for p in out.iterdir()) == [TRAIN_LOCK_NAME]  # nothing written
    summary = run(data, out, BASE, OptimConfig())  # the lock is free again
    assert summary["steps"] == BASE.iterations


def test_a_damaged_state_description_or_attempt_record_starts_over_saying_why(tmp_path: Path) -> None:
    """state.json and attempt.json that are JSON but no object (a truncated or hand-edited file): the run starts over
    (resume.load says why) instead of failing with an AttributeError."""
    from pgolf.train import resume
    from pgolf.train.loop import begin_attempt

    folder = tmp_path / RESUME_DIR
    folder.mkdir()
    (folder / META_NAME).write_text("[]")
    state, meta, why = resume.load(folder, "f" * 64)
    assert state is None and meta is None and "not a saved state's description" in why and "starting over" in why
    (folder / ATTEMPT_NAME).write_text("[1, 2]")
    assert begin_attempt(folder, None, 0) == 1  # an earlier attempt, however damaged its record
    assert json.loads((folder / ATTEMPT_NAME).read_text())["attempts"] == 2


def test_a_periodic_save_that_fails_does_not_end_the_training(data: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    """A full disk at a periodic save (two state files for a moment): the sweep says so and trains on; the saved
    state is a convenience, the training is the job."""
    import pgolf.train.resume as resume

    real, calls = resume.save, {"n": 0}

    def save(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise OSError(28, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(resume, "save", save)
    summary = run(data, tmp_path / "full", dataclasses.replace(BASE, resume_every_steps=2), OptimConfig())
    err = capsys.readouterr().err
    assert "resume: could not save the state of step 2" in err and "No space left on device" in err
    assert summary["steps"] == 6 and calls["n"] == 2  # the save at step 4 was tried again (and worked)
