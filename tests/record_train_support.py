"""Running the record's training loop and pgolf's side by side (tests/test_record_train_oracle.py and its torchrun
worker tests/dist_record_train_worker.py).

Both loops drive the SAME model class, the record's own GPT, so that only the loops are compared: pgolf's
:func:`pgolf.train.loop.train_model` gets it through :class:`RecordModel` (pgolf's model interface around it; the
record's 3-D weight banks go to pgolf's Muon as stacks of matrices). Both get the same initial weights, the same
shards and the same fake clock (:class:`record_oracle.FakeClock`), and both runs are observed the same way: at every
optimizer step the learning rate of each group, Muon's momentum and the loop state; every micro-batch loss; the
state at the first real step (after the warm-up's restore); the saved EMA weights.
"""

from __future__ import annotations

import copy
import json
import types
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

import oracle_train as ot

import record_oracle as ro
from pgolf.config import ModelConfig, OptimConfig, TrainConfig
from pgolf.train import loop
from pgolf.train.checkpoint import load_checkpoint
from pgolf.train.distributed import DistInfo
from pgolf.train.grad_fusion import FusedGradAccumulation
from pgolf.train.optim import Muon

BANKS = ("qo_bank", "kv_bank", "mlp_up_bank", "mlp_down_bank")
MICRO_TOKENS = 32  # per micro-batch; 8 micro-batches per step as in the record (A = 8 // world_size)
SEQ_LEN = 16
SHARDS = [30_000, 30_000]
DT_SECONDS = 60.0  # fake seconds per clock read: frac 0.10, 0.30, 0.50, ... at the tops of steps 0, 1, 2, ...;
# warmdown from step 1, looping from step 2, and the step ending at 600 s (step 4) is the last: 5 real steps


class RecordModel(nn.Module):
    """The record's GPT behind pgolf's model interface: ``looping``, ``forward(inputs [n], targets [n], ...)``."""

    def __init__(self, record_gpt: nn.Module):
        super().__init__()
        self.rec = record_gpt
        self.losses: list[float] = []
        self.log_losses = True  # off during train.fused_grad_accumulation's probe: that forward is no micro-batch

    @property
    def looping(self) -> bool:
        return bool(self.rec.looping_active)

    @looping.setter
    def looping(self, on: bool) -> None:
        self.rec.looping_active = bool(on)

    def forward(self, inputs, targets, cu_seqlens=None, max_seqlen=None):
        loss = self.rec(inputs[None], targets[None], cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
        if self.log_losses:
            self.losses.append(float(loss.detach()))
        return loss

    def groups(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        """The record's split: the 4 banks -> Muon, tok_emb -> AdamW (embedding), every other parameter -> AdamW
        (scalar), the same sets as the record's ``Optimizers``."""
        named = dict(self.named_parameters())
        matrix = [(f"rec.{b}", named[f"rec.{b}"]) for b in BANKS]
        embedding = [("rec.tok_emb.weight", named["rec.tok_emb.weight"])]
        taken = {name for name, _ in matrix + embedding}
        return {"matrix": matrix, "embedding": embedding,
                "scalar": [(n, p) for n, p in named.items() if n not in taken]}


def tiny_h(mod, data_dir: Path, world_size: int, rank: int, warmup_steps: int, distributed: bool):
    h = ot.make_h(mod, data_dir, world_size, rank, train_batch_tokens=8 * MICRO_TOKENS, train_seq_len=SEQ_LEN,
                  warmup_steps=warmup_steps)
    h.distributed = distributed
    return h


def pgolf_configs(h, **train_overrides) -> tuple[ModelConfig, OptimConfig, TrainConfig]:
    """The record recipe's options with the record's tiny hyperparameters ``h`` (only vocab_size and loop_count of
    the model section are read by the loop)."""
    model_cfg = ModelConfig(vocab_size=h.vocab_size, loop_count=h.num_loops + 1)
    optim_cfg = OptimConfig(
        matrix_lr=h.matrix_lr, muon_momentum=h.muon_momentum, muon_momentum_warmup_start=h.muon_momentum_warmup_start,
        muon_momentum_warmup_steps=h.muon_momentum_warmup_steps, muon_row_normalize=h.muon_row_normalize,
        ns_steps=h.muon_backend_steps, muon_weight_decay=h.muon_wd, embed_lr=h.tied_embed_lr,
        embed_weight_decay=h.embed_wd, scalar_lr=h.scalar_lr, scalar_weight_decay=h.adam_wd, adam_beta1=h.beta1,
        adam_beta2=h.beta2, adam_eps=h.adam_eps, muon_precision="record_bf16", adam_fused="always",
    )
    train = dict(
        train_batch_tokens=h.train_batch_tokens, micro_batch_tokens=h.train_batch_tokens // 8,
        train_seq_len=h.train_seq_len, max_wallclock_seconds=h.max_wallclock_seconds, budget_reading="record",
        reserve_seconds=h.gptq_reserve_seconds, iterations=h.iterations, warmdown_fraction=h.warmdown_frac,
        min_lr_fraction=h.min_lr, warmup_steps=h.warmup_steps, warmup_cu_passes=3, warmup_restore="record",
        data_stream="record", micro_batch_order="interleaved", cu_seqlens_pad="multiple_of_64", clip_scope="per_rank",
        grad_clip_norm=h.grad_clip_norm, ema_decay=h.ema_decay, param_storage="fp32",
        loop_enable_fraction=h.enable_looping_at, compile=False, fused_kernels=False, log_every_steps=1,
    )
    train.update(train_overrides)
    return model_cfg, optim_cfg, TrainConfig(**train)


def _momentum_of(muon) -> dict[str, torch.Tensor]:
    """The record Muon's momentum per bank: the full buffer (1 process) or this rank's shard (torchrun)."""
    if getattr(muon, "_distributed", False):
        return {tuple(m["p"].shape): m["shard_mom"].clone() for m in muon._bank_meta}
    return {tuple(p.shape): muon.state[p]["momentum_buffer"].clone()
            for p in muon.param_groups[0]["params"] if "momentum_buffer" in muon.state[p]}


def run_record(mod, h, init: dict, keep_fp32: bool = True) -> dict[str, Any]:
    """The record's train_model on CPU with the fake clock; returns what it observed."""
    built: dict[str, Any] = {}
    out: dict[str, Any] = {"steps": [], "losses": []}
    real_step, real_time, real_eval, real_clip = mod.Optimizers.step, mod.time, mod.eval_val, torch.nn.utils.clip_grad_norm_

    def clip_spy(params, max_norm, *args, **kwargs):
        norm = real_clip(params, max_norm, *args, **kwargs)
        out["steps"][-1]["grad_norm"] = float(norm)
        return norm

    def step_hook(self, distributed=False):
        model = built["model"]
        if len(out["steps"]) - 1 == 2 * h.warmup_steps:  # the first real step, before it changes anything
            out["after_warmup"] = {"params": {k: v.detach().clone() for k, v in model.state_dict().items()},
                                   "momentum": _momentum_of(self.optimizer_muon),
                                   "adam_states": len(self.optimizer_tok.state) + len(self.optimizer_scalar.state)}
        out["steps"][-1].update(
            lr=[g["lr"] for opt in (self.optimizer_muon, self.optimizer_tok, self.optimizer_scalar) for g in opt.param_groups],
            momentum=self.optimizer_muon.param_groups[0]["momentum"], looping=bool(model.looping_active))
        result = real_step(self, distributed)
        out["live"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        out["steps"].append({})
        return result

    def on_build(model):
        built["model"] = model
        forward = model.forward

        def recording_forward(*args, **kwargs):
            loss = forward(*args, **kwargs)
            out["losses"].append(float(loss.detach()))
            return loss

        model.forward = recording_forward

    out["steps"].append({})
    mod.Optimizers.step, mod.eval_val = step_hook, (lambda *a, **k: (0.0, 0.0))
    mod.time = types.SimpleNamespace(perf_counter=ot.FakeClock(DT_SECONDS))
    torch.nn.utils.clip_grad_norm_ = clip_spy
    try:
        with ro.cpu_patches(), ot.patched_gpt(mod, init, keep_fp32=keep_fp32, on_build=on_build):
            base_model, _, _ = mod.train_model(h, torch.device("cpu"), None)
    finally:
        mod.Optimizers.step, mod.time, mod.eval_val = real_step, real_time, real_eval
        torch.nn.utils.clip_grad_norm_ = real_clip
    out["steps"].pop()  # the empty record opened after the last step
    out["final"] = {k: v.detach().float().clone() for k, v in base_model.state_dict().items()}
    return out


def run_pgolf(mod, h, init: dict, data_dir: Path, out_dir: Path, info: DistInfo, model: nn.Module | None = None,
              **train_overrides) -> dict[str, Any]:
    """pgolf's train_model on the same record GPT (``model``, else one built with ``init``), initial weights,
    shards and fake clock; ``train_overrides`` change the record recipe's train options."""
    model = RecordModel(model if model is not None else ot.cpu_model(mod, h, init))
    model_cfg, optim_cfg, train_cfg = pgolf_configs(h, **train_overrides)
    out: dict[str, Any] = {"steps": []}
    real_optimizer_step, real_clip = loop.optimizer_step, torch.nn.utils.clip_grad_norm_

    def clip_spy(params, max_norm, *args, **kwargs):
        norm = real_clip(params, max_norm, *args, **kwargs)
        out["steps"][-1]["grad_norm"] = float(norm)
        return norm

    def step_spy(params, optimizers, grad_clip_norm, info_, clip_scope="global"):
        muon = next(opt for opt in optimizers if isinstance(opt, Muon))
        if len(out["steps"]) == 2 * h.warmup_steps:
            out["after_warmup"] = {
                "params": {k.removeprefix("rec."): v.detach().clone() for k, v in model.state_dict().items()},
                "momentum": {tuple(p.shape): muon.state[p]["momentum_buffer"].clone()
                             for p in muon.param_groups[0]["params"] if "momentum_buffer" in muon.state[p]},
                "adam_states": sum(len(opt.state) for opt in optimizers if not isinstance(opt, Muon)),
            }
        lrs = {g["name"]: g["lr"] for opt in optimizers for g in opt.param_groups}
        out["steps"].append({"lr": [lrs["matrix"], lrs["embedding"], lrs["scalar"]],
                             "momentum": Muon.group_momentum(muon.param_groups[0]), "looping": model.looping})
        real_optimizer_step(params, optimizers, grad_clip_norm, info_, clip_scope)
        out["live"] = {k.removeprefix("rec."): v.detach().clone() for k, v in model.state_dict().items()}

    real_probe = FusedGradAccumulation._probe

    def quiet_probe(self, *args):  # the probe's eager forward (once per loop state) is not one of the micro-batches
        model.log_losses = False
        try:
            return real_probe(self, *args)
        finally:
            model.log_losses = True

    loop.optimizer_step, torch.nn.utils.clip_grad_norm_ = step_spy, clip_spy
    FusedGradAccumulation._probe = quiet_probe
    try:
        summary = loop.train_model(model, model.groups(), model_cfg, optim_cfg, train_cfg, 0, data_dir, out_dir,
                                   info, clock=ot.FakeClock(DT_SECONDS))
    finally:
        loop.optimizer_step, torch.nn.utils.clip_grad_norm_ = real_optimizer_step, real_clip
        FusedGradAccumulation._probe = real_probe
    out["losses"] = model.losses
    out["summary"] = summary
    if info.is_main:
        state, _ = load_checkpoint(out_dir / "checkpoint")
        out["final"] = {k.removeprefix("rec."): v for k, v in state.items()}
    else:
        out["final"] = None
    return out


def initial_state(mod, h, seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return copy.deepcopy(ot.cpu_model(mod, h).state_dict())


def shard_of(full: torch.Tensor, world_size: int, rank: int) -> torch.Tensor:
    """Rank ``rank``'s rows of a zero-padded bank, as the record's sharded Muon holds them ([ceil(B / W), ...])."""
    rows = -(-full.shape[0] // world_size)
    padded = torch.cat([full, full.new_zeros((rows * world_size - full.shape[0],) + tuple(full.shape[1:]))])
    return padded[rank * rows:(rank + 1) * rows]


def compare(record: dict, pgolf: dict, world_size: int, rank: int, sharded: bool) -> dict[str, Any]:
    """The differences between the two runs, as plain numbers (0 everywhere means bit for bit)."""
    def max_abs(a: dict, b: dict) -> float:
        if set(a) != set(b):  # e.g. momentum kept on one side only
            return float("inf")
        return max((float((a[k].float() - b[k].float()).abs().max()) for k in a), default=0.0)

    rec_mom, pg_mom = record["after_warmup"]["momentum"], pgolf["after_warmup"]["momentum"]
    if sharded:
        pg_mom = {shape: shard_of(m, world_size, rank) for shape, m in pg_mom.items()}
    return {
        "steps": [len(record["steps"]), len(pgolf["steps"])],
        "schedule_equal": [
            (r.get("lr"), r.get("momentum"), r.get("looping")) == (p.get("lr"), p.get("momentum"), p.get("looping"))
            for r, p in zip(record["steps"], pgolf["steps"])
        ],
        "record_schedule": [(r["lr"], r["momentum"], r["looping"]) for r in record["steps"]],
        "grad_norms": [[r.get("grad_norm"), p.get("grad_norm")] for r, p in zip(record["steps"], pgolf["steps"])],
        "loss_count": [len(record["losses"]), len(pgolf["losses"])],
        "max_loss_diff": max(abs(a - b) for a, b in zip(record["losses"], pgolf["losses"])),
        "real_step_losses": record["losses"][-5 * 8 // world_size:],
        "after_warmup_params_diff": max_abs(record["after_warmup"]["params"], pgolf["after_warmup"]["params"]),
        "adam_states": [record["after_warmup"]["adam_states"], pgolf["after_warmup"]["adam_states"]],
        "momentum_shapes": [sorted(map(list, rec_mom)), sorted(map(list, pg_mom))],
        "momentum_diff": max_abs({str(k): v for k, v in rec_mom.items()}, {str(k): v for k, v in pg_mom.items()}),
        "momentum_nonzero": any(float(t.float().abs().max()) > 0 for t in rec_mom.values()),
        "live_diff": max_abs(record["live"], pgolf["live"]),
        "final_ema_diff": None if pgolf["final"] is None else max_abs(record["final"], pgolf["final"]),
    }


def dump(result: dict, path: Path) -> None:
    path.write_text(json.dumps(result))


def world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0
