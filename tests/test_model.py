"""The GPT: record parameter count, every feature switch, document isolation, causality, roles and groups."""

from __future__ import annotations

import copy
import dataclasses
import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from pgolf import cli
from pgolf.model.attention import build_cu_seqlens, pad_cu_seqlens
from pgolf.config import ConfigError, ModelConfig
from pgolf.model.gpt import (
    GPT,
    GROUPS,
    ROLES,
    build_meta,
    count_parameters,
    count_parameters_by_role,
    exclusive_self_attention,
    param_groups,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one CPU thread (tests/conftest.py)


RECORD_PARAMS = 35_945_671  # record.md: the PR #1855 model

# Tiny model with every record feature on: 4 layers (1-2 looped twice -> 6 applications), two lanes from layer 2.
TINY = ModelConfig(
    vocab_size=300,
    num_layers=4,
    model_dim=64,
    num_heads=4,
    num_kv_heads=2,
    rope_dims=8,
    xsa_last_n=4,
    loop_start=1,
    loop_end=2,
    loop_count=2,
    parallel_residual_start=2,
)
SEQ_LEN = 16


def tiny(**changes) -> ModelConfig:
    return dataclasses.replace(TINY, **changes)


def randomized(cfg: ModelConfig, seed: int = 0) -> GPT:
    """A model whose zero-initialized paths (o, down, gates, smear lambda) are all active, so leaks can show."""
    torch.manual_seed(seed)
    model = GPT(cfg, train_seq_len=SEQ_LEN)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * (0.3 if p.ndim == 2 else 0.2))
        if model.smear is not None:
            model.smear.lam.fill_(1.0)
    return model.eval()


def document(length: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    doc = torch.randint(2, 300, (length,), generator=g)
    doc[0] = 1  # BOS
    return doc


# ------------------------------------------------------------------------------------------ parameter count


@pytest.fixture(scope="module")
def record_meta() -> GPT:
    return build_meta(ModelConfig())


def test_record_config_parameter_count(record_meta):
    groups = count_parameters(ModelConfig())
    assert sum(groups.values()) == RECORD_PARAMS
    model = record_meta
    assert sum(p.numel() for p in model.parameters()) == RECORD_PARAMS
    assert all(p.is_meta for p in model.parameters())
    # the lead's arithmetic, checked piece by piece
    assert groups["embedding"] == 8192 * 512
    assert groups["matrix"] == 11 * (2 * 512 * 512 + 2 * 512 * 256 + 2 * 512 * 2048)
    assert model.num_skip_slots == 8 and model.skip_weights.shape == (8, 512)
    assert model.lane_post_lambdas.shape == (11, 2, 2) and model.lane_resid_lambdas.shape == (11, 2)
    roles = count_parameters_by_role(ModelConfig())
    assert roles["attn_gate"] == 11 * 8 * 12
    assert roles["gate"] == 12 + 1 + 8 * 512  # smear W + lambda, skip gates


def test_cli_summary_prints_total_last(tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("run: count-check\n")
    assert cli.main(["model", "summary", "--config", str(recipe)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == f"total_params: {RECORD_PARAMS}"
    assert "group matrix: 31719424" in lines


def test_cli_summary_from_json(capsys):
    section = {"num_layers": 2, "vocab_size": 300, "xsa_last_n": 2, "loop_count": 1, "parallel_residual_start": -1}
    assert cli.main(["model", "summary", "--model-json", json.dumps(section)]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == f"total_params: {sum(count_parameters(ModelConfig(**section)).values())}"


def test_cli_summary_bad_json(capsys):
    assert cli.main(["model", "summary", "--model-json", '{"num_layer": 2}']) == 2
    assert "num_layer" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- structure


def test_virtual_layers_of_the_record():
    model = build_meta(ModelConfig())  # its own instance: the test flips runtime state
    assert model.looping is False
    assert model.virtual_layers() == tuple(range(11))
    model.looping = True
    assert model.virtual_layers() == (0, 1, 2, 3, 4, 5, 3, 4, 5, 3, 4, 5, 6, 7, 8, 9, 10)


def test_init_follows_the_record():
    model = GPT(tiny(tie_embeddings=False))
    block = model.blocks[1]
    for lin in (block.attn.q, block.attn.k, block.attn.v, block.mlp.up):
        w = lin.weight
        gram = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
        torch.testing.assert_close(gram, torch.eye(gram.shape[0]), atol=1e-5, rtol=0)
    for t in (block.attn.o.weight, block.mlp.down.weight, block.attn.gate.weight, model.smear.gate.weight,
              model.smear.lam, model.skip_gates, model.lm_head.weight):
        assert torch.count_nonzero(t) == 0
    assert torch.equal(block.resid_mix[0], torch.ones(64)) and torch.equal(block.resid_mix[1], torch.zeros(64))
    assert torch.all(block.attn.q_gain == 5.0)
    assert torch.all(model.skip_weights == 1.0) and torch.all(model.lane_post_lambdas == 1.0)
    torch.testing.assert_close(model.lane_resid_lambdas, torch.full((4, 2), 1.1))
    assert abs(model.tok_emb.weight.std().item() - 0.005) < 0.0005


def test_tied_head_shares_one_weight():
    model = GPT(TINY)
    assert model.lm_head.weight is model.tok_emb.weight
    assert "lm_head.weight" not in model.state_dict()
    assert [n for n, _ in model.named_parameters()].count("tok_emb.weight") == 1
    clone = copy.deepcopy(model)
    assert clone.lm_head.weight is clone.tok_emb.weight and clone.tok_emb.weight is not model.tok_emb.weight


def test_untied_head_is_a_separate_matrix():
    model = GPT(tiny(tie_embeddings=False))
    assert model.lm_head.weight is not model.tok_emb.weight
    assert model.param_roles()["lm_head.weight"] == "head"


def test_xsa_removes_the_own_value_direction():
    g = torch.Generator().manual_seed(0)
    y, v = torch.randn(5, 6, 8, generator=g), torch.randn(5, 2, 8, generator=g)
    out = exclusive_self_attention(y, v)
    v_hat = F.normalize(v, dim=-1).repeat_interleave(3, dim=1)  # head h -> KV head h // 3
    torch.testing.assert_close((out * v_hat).sum(-1), torch.zeros(5, 6), atol=1e-5, rtol=0)
    torch.testing.assert_close(out + (y * v_hat).sum(-1, keepdim=True) * v_hat, y, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------- roles and groups


def test_param_roles_and_groups_cover_everything(record_meta):
    for model in (record_meta, build_meta(tiny(tie_embeddings=False, attn_gate="dense"))):
        roles = model.param_roles()
        assert set(roles) == {n for n, _ in model.named_parameters()}
        assert set(roles.values()) <= set(ROLES)
        groups = param_groups(model)
        assert tuple(groups) == GROUPS
        names = [n for group in groups.values() for n, _ in group]
        assert sorted(names) == sorted(roles)
    groups = param_groups(record_meta)
    assert {n for n, _ in groups["embedding"]} == {"tok_emb.weight"}
    assert "blocks.0.attn.q.weight" in dict(groups["matrix"]) and "blocks.0.attn.gate.weight" in dict(groups["scalar"])
    assert all(p.ndim == 2 for _, p in groups["matrix"]) and len(groups["matrix"]) == 66


def test_param_roles_reject_an_unknown_parameter():
    model = GPT(TINY)
    model.stray = nn.Parameter(torch.zeros(3))
    with pytest.raises(RuntimeError, match="stray"):
        model.param_roles()
    with pytest.raises(RuntimeError, match="stray"):
        param_groups(model)


def test_hessian_inputs_name_real_modules_and_fire(record_meta):
    model = GPT(TINY)
    model.looping = True
    inputs = model.hessian_inputs()
    roles = model.param_roles()
    assert set(inputs) == {n for n, r in roles.items() if r in ("attn", "mlp", "embedding", "head")}
    assert len(record_meta.hessian_inputs()) == 67  # record.md: 67 matrices
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    calls: dict[str, list[int]] = {}

    def hook(name):
        return lambda module, args: calls.setdefault(name, []).append(args[0].shape[-1])

    for name in set(inputs.values()):
        modules[name].register_forward_pre_hook(hook(name))
    model(document(20, 0), document(20, 1))
    for param_name, module_name in inputs.items():
        assert calls[module_name][0] == params[param_name].shape[1]  # input width = matrix columns
    assert len(calls["blocks.1.attn.q"]) == 2  # looped layer: one call per application
    assert inputs["tok_emb.weight"] == "lm_head" and inputs["blocks.0.attn.k.weight"] == "blocks.0.attn.q"


# ------------------------------------------------------------------------------------------ feature switches

SWITCHES = {
    "record_like": {},
    "untied": {"tie_embeddings": False},
    "no_softcap": {"logit_softcap": 0.0},
    "no_qk_norm": {"qk_norm": False},
    "no_rope": {"rope_dims": 0},
    "full_rope": {"rope_dims": 16},
    "no_q_gain": {"q_gain_init": 0.0},
    "no_xsa": {"xsa_last_n": 0},
    "xsa_last_1": {"xsa_last_n": 1},
    "no_attn_gate": {"attn_gate": "none"},
    "dense_attn_gate": {"attn_gate": "dense"},
    "no_smear": {"smear_gate": False},
    "leaky_smear": {"smear_bos_mask": False},
    "no_unet": {"unet_skips": False},
    "ungated_skips": {"skip_gates": False},
    "no_recurrence": {"loop_count": 1},
    "triple_recurrence": {"loop_count": 3, "parallel_residual_start": 3},
    "single_lane": {"parallel_residual_start": -1},
    "lanes_from_0": {"parallel_residual_start": 0},
    "lanes_inside_loop": {"parallel_residual_start": 1},
    "relu_sq": {"mlp_activation": "relu_sq"},
    "mha": {"num_kv_heads": 4},
    "mqa": {"num_kv_heads": 1},
    "odd_layers": {"num_layers": 3, "loop_end": 1, "parallel_residual_start": 2, "xsa_last_n": 3},
    "mlp_x3": {"mlp_mult": 3.0},
}


def test_a_single_lane_decoder_application_after_the_lanes_is_refused():
    """Loop 1-2 x3 with lanes from 2: the decoder runs layers 2, 1, 2, 3; the record would run layer 1 on the stale
    single-lane state and discard it, so the config is refused."""
    with pytest.raises(ConfigError, match="decoder application 5 single-lane after the two lanes started"):
        tiny(loop_count=3)


@pytest.mark.parametrize("looping", [False, True])
@pytest.mark.parametrize("switch", sorted(SWITCHES))
def test_every_switch_trains(switch, looping):
    cfg = tiny(**SWITCHES[switch])
    model = randomized(cfg, seed=1).train()
    model.looping = looping
    ids = torch.cat([document(11, 2), document(25, 3)])
    targets = torch.roll(ids, -1)
    targets[-1] = -100
    loss = model(ids, targets)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{switch}: {name} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{switch}: {name} has a non-finite gradient"
    # a parameter of the last block always learns something
    assert model.blocks[-1].mlp.down.weight.grad.abs().sum() > 0


def test_fresh_model_loss_is_near_uniform():
    model = GPT(TINY, train_seq_len=SEQ_LEN)
    ids = torch.cat([document(30, 4), document(30, 5)])
    loss = model(ids, torch.roll(ids, -1))
    assert abs(loss.item() - math.log(300)) < 0.05  # zero o/down and tiny embeddings: nearly uniform logits


def test_loss_matches_logits_and_ignores_minus_100():
    model = randomized(tiny(logit_softcap=5.0), seed=2)
    model.looping = True
    ids = torch.cat([document(9, 6), document(14, 7)])
    targets = torch.roll(ids, -1)
    targets[[0, 4, 22]] = -100
    logits = model.forward_logits(ids)
    assert logits.dtype == torch.float32 and logits.shape == (23, 300)
    assert logits.abs().max() <= 5.0  # softcapped
    keep = targets != -100
    expected = F.cross_entropy(logits[keep], targets[keep])
    torch.testing.assert_close(model(ids, targets), expected, atol=1e-5, rtol=1e-5)


def test_looping_changes_the_function():
    model = randomized(TINY, seed=3)
    ids = document(20, 8)
    off = model.forward_logits(ids)
    model.looping = True
    assert not torch.allclose(model.forward_logits(ids), off)


def test_bad_inputs_are_rejected():
    model = GPT(TINY)
    with pytest.raises(ValueError, match="packed 1-D"):
        model(torch.ones(2, 5, dtype=torch.long), torch.ones(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="target_ids shape"):
        model(torch.ones(5, dtype=torch.long), torch.ones(4, dtype=torch.long))
    with pytest.raises(ValueError, match="max_seqlen is required"):
        model.forward_logits(torch.ones(5, dtype=torch.long), cu_seqlens=torch.tensor([0, 5], dtype=torch.int32))
    with pytest.raises(TypeError, match="ModelConfig"):
        GPT({"num_layers": 2})


# ------------------------------------------------------------------------------- isolation and causality

ISOLATION_CASES = {
    "record_like_loop_off": (TINY, False),
    "record_like_loop_on": (TINY, True),
    "lanes_from_0_loop_on": (tiny(parallel_residual_start=0), True),
    "untied_dense_gate": (tiny(tie_embeddings=False, attn_gate="dense"), True),
}


@pytest.mark.parametrize("case", sorted(ISOLATION_CASES))
def test_no_cross_document_leakage(case):
    cfg, looping = ISOLATION_CASES[case]
    model = randomized(cfg, seed=4)
    model.looping = looping
    first, second = document(13, 10), document(21, 11)
    alone = model.forward_logits(second)
    packed = model.forward_logits(torch.cat([first, second]))[13:]
    torch.testing.assert_close(packed, alone, atol=1e-4, rtol=1e-4)


def test_leaky_smear_gate_is_caught():
    """Without the BOS mask the previous document's last token leaks into the next BOS: the test above can fail."""
    model = randomized(tiny(smear_bos_mask=False), seed=4)
    model.looping = True
    first, second = document(13, 10), document(21, 11)
    alone = model.forward_logits(second)
    packed = model.forward_logits(torch.cat([first, second]))[13:]
    assert (packed - alone).abs().max() > 1e-2


def test_padded_cu_seqlens_give_the_same_logits():
    model = randomized(TINY, seed=5)
    model.looping = True
    ids = torch.cat([document(7, 12), document(30, 13), document(5, 14)])
    cu, max_seqlen = build_cu_seqlens(ids, max_seqlen=SEQ_LEN)
    plain = model.forward_logits(ids, cu, max_seqlen)
    padded = model.forward_logits(ids, pad_cu_seqlens(cu, cu.numel() + 4), max_seqlen)
    torch.testing.assert_close(padded, plain, atol=0, rtol=0)
    # default segmentation (cu_seqlens=None) uses train_seq_len, the same cut
    torch.testing.assert_close(model.forward_logits(ids), plain, atol=0, rtol=0)


def test_rope_positions_restart_at_a_document_cut():
    """A long document cut at train_seq_len: its second piece sees no attention from the first piece."""
    model = randomized(tiny(smear_gate=False), seed=6)
    doc = document(2 * SEQ_LEN, 15)
    second_piece = doc[SEQ_LEN:].clone()
    alone = model.forward_logits(second_piece, cu_seqlens=torch.tensor([0, SEQ_LEN], dtype=torch.int32), max_seqlen=SEQ_LEN)
    packed = model.forward_logits(doc)[SEQ_LEN:]
    torch.testing.assert_close(packed, alone, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("looping", [False, True])
def test_causality(looping):
    model = randomized(TINY, seed=7)
    model.looping = looping
    ids = torch.cat([document(12, 16), document(20, 17)])
    base = model.forward_logits(ids)
    for t in (3, 12, 20):
        changed = ids.clone()
        changed[t] = (changed[t] + 7) % 298 + 2
        out = model.forward_logits(changed)
        torch.testing.assert_close(out[:t], base[:t], atol=1e-5, rtol=1e-5)
        assert not torch.allclose(out[t], base[t])


# ------------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_backends_give_the_same_loss_under_bf16():
    from pgolf.model.attention import available_backends

    device = torch.device("cuda")
    model = randomized(tiny(model_dim=256), seed=8).to(device)  # head dim 64: FlashAttention's smallest common size
    model.looping = True
    ids = torch.cat([document(300, 18), document(700, 19), document(100, 20)]).to(device)
    targets = torch.roll(ids, -1)
    losses = {}
    for backend in available_backends(device):
        model.attn_backend = backend
        with torch.autocast("cuda", dtype=torch.bfloat16):
            losses[backend] = model(ids, targets).item()
    for backend, loss in losses.items():
        assert abs(loss - losses["sdpa"]) < 0.02 * abs(losses["sdpa"]), losses
