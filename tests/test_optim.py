"""Tests of pgolf.train.optim against plain float64 references written here from record.md's formulas."""

from __future__ import annotations

import importlib.util
import io
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pgolf.config import OptimConfig
from pgolf.train import optim
from pgolf.train.optim import (
    FIXED_NS_COEFFS,
    POLAR_EXPRESS_COEFFS,
    Muon,
    build_optimizers,
    lr_shape_scale,
    muon_momentum_at,
    newton_schulz,
    ns_coefficient_schedule,
    set_lr_multiplier,
)

WORKER = Path(__file__).with_name("dist_optim_worker.py")

# float32 Muon vs the float64 reference after 6 steps: weights are O(1) (up to ~3), float32 rounding of the
# weights alone is ~2e-7 and each step adds lr * O with O's error amplified by the polynomial (a up to ~8);
# observed up to ~8e-7. A wrong momentum, lr or decay moves weights by ~1e-3.
F32_ATOL = 5e-6
F32_RTOL = 1e-6


# --------------------------------------------------------------------------------------------------------------
# Plain references (numpy float64, one matrix at a time)
# --------------------------------------------------------------------------------------------------------------


def ref_newton_schulz(G: np.ndarray, coeffs: list[tuple[float, float, float]], eps: float = 1e-7) -> np.ndarray:
    X = G / (np.linalg.norm(G) + eps)
    tall = X.shape[0] > X.shape[1]
    if tall:
        X = X.T
    for a, b, c in coeffs:
        A = X @ X.T
        X = a * X + (b * A + c * (A @ A)) @ X
    return X.T if tall else X


def ref_poly(s: np.ndarray, coeffs) -> np.ndarray:
    """What the iteration does to one singular value."""
    for a, b, c in coeffs:
        s = a * s + b * s**3 + c * s**5
    return s


class RefMuon:
    """record.md's Muon, written out per matrix in float64."""

    def __init__(self, params, lr, momentum, warmup_start, warmup_steps, nesterov, row_norm, coeffs, wd):
        self.params = [p.astype(np.float64).copy() for p in params]
        self.bufs = [np.zeros_like(p) for p in self.params]
        self.lr, self.momentum, self.warmup_start, self.warmup_steps = lr, momentum, warmup_start, warmup_steps
        self.nesterov, self.row_norm, self.coeffs, self.wd = nesterov, row_norm, coeffs, wd
        self.t = 0

    def step(self, grads, lr_mult):
        frac = min(self.t / self.warmup_steps, 1.0)
        mu = self.warmup_start + (self.momentum - self.warmup_start) * frac
        lr = self.lr * lr_mult
        for i, g in enumerate(grads):
            g = g.astype(np.float64)
            self.bufs[i] = mu * self.bufs[i] + g
            u = g + mu * self.bufs[i] if self.nesterov else self.bufs[i]
            if self.row_norm:
                u = u / (np.linalg.norm(u, axis=1, keepdims=True) + 1e-7)
            o = ref_newton_schulz(u, self.coeffs)
            rows, cols = u.shape
            self.params[i] = self.params[i] * (1 - lr * self.wd) - lr * math.sqrt(max(1.0, rows / cols)) * o
        self.t += 1


SHAPES = [(8, 8), (12, 4), (8, 8), (4, 12), (6, 6), (8, 8)]  # tall, wide, and three 8x8 sharing a batch


def _run_pair(coeff_name: str, nesterov: bool, row_norm: bool, steps: int = 6):
    """Run Muon (float32) and RefMuon (float64) on the same random grads; return both final params."""
    rng = np.random.default_rng(7)
    init = [rng.standard_normal(s).astype(np.float32) for s in SHAPES]
    grads = [[rng.standard_normal(s).astype(np.float32) for s in SHAPES] for _ in range(steps)]
    coeffs = list(POLAR_EXPRESS_COEFFS) if coeff_name == "polar_express" else [FIXED_NS_COEFFS] * 5
    kw = dict(momentum=0.9, warmup_start=0.5, warmup_steps=4, nesterov=nesterov, row_norm=row_norm, wd=0.2)
    ref = RefMuon(init, lr=0.05, coeffs=coeffs, **kw)
    params = [torch.nn.Parameter(torch.from_numpy(p.copy())) for p in init]
    opt = Muon(
        [{"params": params, "initial_lr": 0.05}],
        lr=0.05,
        momentum=0.9,
        momentum_warmup_start=0.5,
        momentum_warmup_steps=4,
        nesterov=nesterov,
        row_normalize=row_norm,
        ns_steps=5,
        ns_coefficients=coeff_name,
        weight_decay=0.2,
    )
    for t in range(steps):
        mult = 1.0 - 0.1 * t
        for p, g in zip(params, grads[t]):
            p.grad = torch.from_numpy(g.copy())
        set_lr_multiplier([opt], mult)
        opt.step()
        ref.step(grads[t], mult)
    return [p.detach().numpy() for p in params], ref.params, init


# --------------------------------------------------------------------------------------------------------------
# Muon vs the reference
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("coeff_name", ["polar_express", "fixed"])
@pytest.mark.parametrize("nesterov,row_norm", [(True, True), (False, False), (True, False)])
def test_muon_matches_plain_reference(coeff_name, nesterov, row_norm):
    ours, ref, init = _run_pair(coeff_name, nesterov, row_norm)
    for i, (a, b, p0) in enumerate(zip(ours, ref, init)):
        assert not np.allclose(a, p0, atol=1e-3), f"matrix {i} did not move"
        np.testing.assert_allclose(a, b, rtol=F32_RTOL, atol=F32_ATOL, err_msg=f"matrix {i} shape {SHAPES[i]}")


def test_polar_express_and_fixed_coefficients_differ():
    polar, _, _ = _run_pair("polar_express", True, True)
    fixed, _, _ = _run_pair("fixed", True, True)
    differences = [np.abs(a - b).max() for a, b in zip(polar, fixed)]
    assert min(differences) > 100 * F32_ATOL, differences


def test_equal_shapes_are_orthogonalized_in_one_batched_call(monkeypatch):
    calls = []
    real = optim.newton_schulz

    def spy(G, *args, **kwargs):
        calls.append(tuple(G.shape))
        return real(G, *args, **kwargs)

    monkeypatch.setattr(optim, "newton_schulz", spy)
    params = [torch.nn.Parameter(torch.randn(s)) for s in SHAPES]
    opt = Muon(params, lr=0.01)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    assert sorted(calls) == sorted([(3, 8, 8), (1, 12, 4), (1, 4, 12), (1, 6, 6)])


# --------------------------------------------------------------------------------------------------------------
# Newton-Schulz
# --------------------------------------------------------------------------------------------------------------


def test_coefficients_verbatim_and_schedules():
    assert POLAR_EXPRESS_COEFFS[0] == (8.156554524902461, -22.48329292557795, 15.878769915207462)
    assert POLAR_EXPRESS_COEFFS[4] == (2.3465413258596377, -1.7097828382687081, 0.42323551169305323)
    assert len(POLAR_EXPRESS_COEFFS) == 5 and FIXED_NS_COEFFS == (3.4445, -4.7750, 2.0315)
    assert ns_coefficient_schedule("polar_express", 3) == POLAR_EXPRESS_COEFFS[:3]
    assert ns_coefficient_schedule("fixed", 7) == (FIXED_NS_COEFFS,) * 7
    assert ns_coefficient_schedule((1, 2, 3), 2) == ((1.0, 2.0, 3.0),) * 2
    with pytest.raises(ValueError, match="cannot cover 6 steps"):
        ns_coefficient_schedule("polar_express", 6)
    with pytest.raises(ValueError, match="expected 'polar_express'"):
        ns_coefficient_schedule("polar", 5)
    with pytest.raises(ValueError, match=r"ns coefficients\[1\]"):
        ns_coefficient_schedule([(1, 2, 3), (1, 2)], 2)
    with pytest.raises(ValueError, match="expected a tensor"):
        newton_schulz(torch.ones(3), "fixed", 5)


G32 = np.array([[1.0, 2.0], [3.0, 4.0], [5.0, -6.0]])  # 3x2 (tall: transposed inside), and its 2x3 transpose


@pytest.mark.parametrize("G", [G32, G32.T], ids=["3x2", "2x3"])
@pytest.mark.parametrize("coeff_name", ["polar_express", "fixed"])
def test_known_output_small_matrix(G, coeff_name):
    coeffs = list(POLAR_EXPRESS_COEFFS) if coeff_name == "polar_express" else [FIXED_NS_COEFFS] * 5
    # By hand, step by step: X0 = G / ||G||_F, work on the wide orientation, X <- aX + (bA + cA^2)X, A = XX^T.
    X = (G.T if G.shape[0] > G.shape[1] else G) / (math.sqrt((G**2).sum()) + 1e-7)  # [2, 3]
    for a, b, c in coeffs:
        A = X @ X.T  # [2, 2]
        X = a * X + (b * A + c * A @ A) @ X
    expected = X.T if G.shape[0] > G.shape[1] else X
    # Independently: the iteration acts on singular values only, so NS(G) = U p(S / ||G||_F) V^T.
    U, S, Vt = np.linalg.svd(G, full_matrices=False)
    via_svd = U @ np.diag(ref_poly(S / (np.sqrt((S**2).sum()) + 1e-7), coeffs)) @ Vt
    np.testing.assert_allclose(expected, via_svd, rtol=0, atol=1e-12)

    got64 = newton_schulz(torch.from_numpy(G), coeff_name, 5).numpy()
    assert got64.dtype == np.float64 and got64.shape == G.shape
    np.testing.assert_allclose(got64, expected, rtol=0, atol=1e-12)
    got32 = newton_schulz(torch.from_numpy(G).float(), coeff_name, 5)
    assert got32.dtype == torch.float32
    np.testing.assert_allclose(got32.numpy(), expected, rtol=0, atol=1e-5)


def test_known_output_diagonal_by_hand():
    # G = [[3, 0], [0, 4], [0, 0]]: ||G||_F = 5, so the singular values start at 0.6 and 0.8 and each step maps
    # s -> a s + b s^3 + c s^5 on the diagonal; everything off it stays 0.
    G = torch.tensor([[3.0, 0.0], [0.0, 4.0], [0.0, 0.0]], dtype=torch.float64)
    s1, s2 = 3.0 / (5.0 + 1e-7), 4.0 / (5.0 + 1e-7)
    for a, b, c in POLAR_EXPRESS_COEFFS:
        s1 = a * s1 + b * s1**3 + c * s1**5
        s2 = a * s2 + b * s2**3 + c * s2**5
    expected = torch.tensor([[s1, 0.0], [0.0, s2], [0.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(newton_schulz(G, "polar_express", 5), expected, rtol=0, atol=1e-13)


@pytest.mark.parametrize("shape", [(16, 64), (64, 16), (4, 24, 48)])
def test_newton_schulz_is_nearly_orthogonal(shape):
    gen = torch.Generator().manual_seed(3)
    G = torch.randn(shape, generator=gen)
    O = newton_schulz(G, "polar_express", 5)
    assert O.shape == G.shape and O.dtype == torch.float32
    S_in = torch.linalg.svdvals(G.double())  # [..., min(rows, cols)]
    S_out = torch.linalg.svdvals(O.double())
    # Exactly what the polynomial predicts for each singular value (up to float32 rounding)...
    norms = torch.linalg.matrix_norm(G.double(), keepdim=True).squeeze(-1)
    predicted = torch.from_numpy(ref_poly((S_in / norms).numpy(), POLAR_EXPRESS_COEFFS))
    predicted = predicted.sort(dim=-1, descending=True).values
    torch.testing.assert_close(S_out, predicted, rtol=0, atol=1e-4)
    # ...and inside the band that polynomial guarantees for inputs with normalized singular values >= 1e-3.
    grid = ref_poly(np.linspace(1e-3, 1.0, 20001), POLAR_EXPRESS_COEFFS)
    assert (S_in / norms).min() >= 1e-3
    assert grid.min() - 1e-4 <= S_out.min() and S_out.max() <= grid.max() + 1e-4
    assert 0.8 < grid.min() and grid.max() < 1.2  # i.e. O is close to orthogonal
    # The fixed tuple leaves a wider band on the same inputs.
    S_fixed = torch.linalg.svdvals(newton_schulz(G, "fixed", 5).double())
    assert (S_fixed.max() - S_fixed.min()) > (S_out.max() - S_out.min())


def test_zero_update_stays_zero():
    O = newton_schulz(torch.zeros(2, 5, 3), "polar_express", 5)
    assert torch.equal(O, torch.zeros(2, 5, 3))


# --------------------------------------------------------------------------------------------------------------
# Momentum warm-up, weight decay, lr shape scaling
# --------------------------------------------------------------------------------------------------------------


def test_momentum_warmup_values():
    assert muon_momentum_at(0, 0.92, 0.97, 1500) == pytest.approx(0.92)
    assert muon_momentum_at(750, 0.92, 0.97, 1500) == pytest.approx(0.945)
    assert muon_momentum_at(1500, 0.92, 0.97, 1500) == pytest.approx(0.97)
    assert muon_momentum_at(9000, 0.92, 0.97, 1500) == pytest.approx(0.97)
    assert muon_momentum_at(0, 0.92, 0.97, 0) == 0.97


def test_momentum_warmup_uses_the_optimizers_own_step_count():
    p = torch.nn.Parameter(torch.zeros(3, 4))
    opt = Muon([p], lr=0.1, momentum=0.9, momentum_warmup_start=0.5, momentum_warmup_steps=4)
    g1, g2 = torch.randn(3, 4), torch.randn(3, 4)
    assert opt.group_momentum(opt.param_groups[0]) == pytest.approx(0.5)
    p.grad = g1
    opt.step()
    assert opt.param_groups[0]["step"] == 1
    assert opt.group_momentum(opt.param_groups[0]) == pytest.approx(0.6)
    p.grad = g2
    opt.step()
    # M_1 = 0.5 * 0 + g1, M_2 = 0.6 * M_1 + g2
    torch.testing.assert_close(opt.state[p]["momentum_buffer"], 0.6 * g1 + g2)
    no_warmup = Muon([torch.nn.Parameter(torch.zeros(2, 2))], lr=0.1, momentum=0.8)
    assert no_warmup.group_momentum(no_warmup.param_groups[0]) == 0.8


@pytest.mark.parametrize("shape", [(12, 3), (3, 12)])
def test_weight_decay_is_decoupled_and_uses_the_unscaled_lr(shape):
    # A zero gradient gives a zero update, so only the decay acts: W_k = W_0 * (1 - lr * wd)^k, the same for a
    # tall matrix (lr scaled by 2 for its update) as for a wide one.
    w0 = torch.randn(shape)
    p = torch.nn.Parameter(w0.clone())
    opt = Muon([{"params": [p], "initial_lr": 0.1}], lr=0.1, weight_decay=0.5)
    for k, mult in enumerate([1.0, 0.5, 0.25]):
        set_lr_multiplier([opt], mult)
        p.grad = torch.zeros(shape)
        opt.step()
    expected = w0 * (1 - 0.1 * 0.5) * (1 - 0.05 * 0.5) * (1 - 0.025 * 0.5)
    torch.testing.assert_close(p.detach(), expected, rtol=1e-6, atol=0)


def test_weight_decay_is_independent_of_the_gradient():
    # Same gradient, with and without decay: the difference is exactly lr * wd * W_0 (decay is not added to G).
    w0, g = torch.randn(6, 6), torch.randn(6, 6)
    results = []
    for wd in (0.0, 0.3):
        p = torch.nn.Parameter(w0.clone())
        opt = Muon([p], lr=0.1, weight_decay=wd)
        p.grad = g.clone()
        opt.step()
        results.append(p.detach())
    torch.testing.assert_close(results[0] - results[1], 0.1 * 0.3 * w0, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape,scale", [((12, 3), 2.0), ((3, 12), 1.0), ((5, 5), 1.0), ((9, 4), 1.5)])
def test_lr_shape_scaling(shape, scale):
    assert lr_shape_scale(*shape) == pytest.approx(scale)
    w0, g = torch.randn(shape), torch.randn(shape)
    p = torch.nn.Parameter(w0.clone())
    opt = Muon([p], lr=0.1, momentum=0.0, nesterov=False, row_normalize=False)
    p.grad = g.clone()
    opt.step()
    direction = newton_schulz(g, "polar_express", 5)
    torch.testing.assert_close(w0 - p.detach(), 0.1 * scale * direction, rtol=1e-5, atol=1e-6)


def test_state_dict_round_trip_continues_identically():
    """Restoring a saved state (as after the thrown-away compile warm-up) restores momentum and step count."""
    gen = torch.Generator().manual_seed(0)
    w0 = torch.randn(5, 3, generator=gen)
    grads = [torch.randn(5, 3, generator=gen) for _ in range(4)]

    def make():
        p = torch.nn.Parameter(w0.clone())
        return p, Muon([p], lr=0.1, momentum=0.9, momentum_warmup_start=0.5, momentum_warmup_steps=3)

    p_a, opt_a = make()
    for g in grads:
        p_a.grad = g.clone()
        opt_a.step()
    p_b, opt_b = make()
    for g in grads[:2]:
        p_b.grad = g.clone()
        opt_b.step()
    blob = io.BytesIO()
    torch.save({"param": p_b.detach(), "optim": opt_b.state_dict()}, blob)
    blob.seek(0)
    saved = torch.load(blob, weights_only=True)
    p_c, opt_c = make()
    with torch.no_grad():
        p_c.copy_(saved["param"])
    opt_c.load_state_dict(saved["optim"])
    assert opt_c.param_groups[0]["step"] == 2
    for g in grads[2:]:
        p_c.grad = g.clone()
        opt_c.step()
    torch.testing.assert_close(p_c.detach(), p_a.detach(), rtol=0, atol=0)


@pytest.mark.parametrize("precision", ["fp32_momentum", "record_bf16"])
def test_a_stack_of_matrices_steps_like_separate_matrices(precision):
    """A 3-D parameter (the record's banks [B, rows, cols]) is B Muon matrices: the same update as B 2-D params."""
    torch.manual_seed(0)
    bank = torch.nn.Parameter(torch.randn(3, 8, 12) * 0.1)
    singles = [torch.nn.Parameter(bank.detach()[i].clone()) for i in range(3)]
    kw = dict(lr=0.05, momentum_warmup_start=0.9, momentum_warmup_steps=5, weight_decay=0.1, precision=precision)
    opt_bank, opt_singles = Muon([bank], **kw), Muon(singles, **kw)
    for _ in range(3):
        g = torch.randn(3, 8, 12)
        bank.grad = g.clone()
        for i, p in enumerate(singles):
            p.grad = g[i].clone()
        opt_bank.step()
        opt_singles.step()
    for i, p in enumerate(singles):
        torch.testing.assert_close(bank.detach()[i], p.detach(), rtol=0, atol=0)


def test_record_bf16_momentum_keeps_mu_in_fp32():
    """bf16 momentum M = mu * M + G with mu applied in fp32 opmath (the foreach kernels would round mu to bf16)."""
    p = torch.nn.Parameter(torch.zeros(4, 4))
    opt = Muon([p], lr=0.0, momentum=0.9200333333333334, precision="record_bf16")
    g1, g2 = torch.randn(4, 4), torch.randn(4, 4)
    for g in (g1, g2):
        p.grad = g.clone()
        opt.step()
    buf = opt.state[p]["momentum_buffer"]
    expected = g1.bfloat16().mul_(0.9200333333333334).add_(g2.bfloat16())
    assert buf.dtype == torch.bfloat16 and torch.equal(buf, expected)


def test_muon_rejects_non_matrices():
    with pytest.raises(ValueError, match=r"param 1: expected a 2-D matrix, got shape \(4,\)"):
        Muon([torch.nn.Parameter(torch.ones(2, 2)), torch.nn.Parameter(torch.ones(4))], lr=0.1)
    with pytest.raises(ValueError, match="momentum"):
        Muon([torch.nn.Parameter(torch.ones(2, 2))], lr=0.1, momentum=1.0)


# --------------------------------------------------------------------------------------------------------------
# build_optimizers and the lr multiplier
# --------------------------------------------------------------------------------------------------------------


def _groups():
    w1, w2 = torch.nn.Parameter(torch.randn(4, 6)), torch.nn.Parameter(torch.randn(6, 4))
    emb = torch.nn.Parameter(torch.randn(10, 4))
    gain, gate = torch.nn.Parameter(torch.ones(4)), torch.nn.Parameter(torch.zeros(1))
    return {"matrix": [("w1", w1), ("w2", w2)], "embedding": [("emb", emb)], "scalar": [("gain", gain), ("gate", gate)]}


def test_build_optimizers_wires_the_config():
    cfg = OptimConfig(ns_coefficients="fixed", ns_steps=4, matrix_lr=0.01, embed_lr=0.2, scalar_lr=0.3)
    groups = _groups()
    muon, adam = build_optimizers(groups, cfg)
    assert isinstance(muon, Muon) and isinstance(adam, torch.optim.AdamW)
    (mg,) = muon.param_groups
    assert mg["params"] == [p for _, p in groups["matrix"]]
    assert (mg["lr"], mg["initial_lr"], mg["weight_decay"]) == (0.01, 0.01, cfg.muon_weight_decay)
    assert (mg["momentum"], mg["momentum_warmup_start"]) == (cfg.muon_momentum, cfg.muon_momentum_warmup_start)
    assert mg["ns_coefficients"] == (FIXED_NS_COEFFS,) * 4
    emb, sca = adam.param_groups
    assert (emb["name"], emb["lr"], emb["initial_lr"], emb["weight_decay"]) == ("embedding", 0.2, 0.2, cfg.embed_weight_decay)
    assert (sca["name"], sca["lr"], sca["weight_decay"]) == ("scalar", 0.3, cfg.scalar_weight_decay)
    assert sca["params"] == [p for _, p in groups["scalar"]]
    assert emb["betas"] == (cfg.adam_beta1, cfg.adam_beta2) and emb["eps"] == cfg.adam_eps
    assert emb["fused"] in (False, None)
    set_lr_multiplier([muon, adam], 0.5)
    assert [g["lr"] for g in muon.param_groups + adam.param_groups] == [0.005, 0.1, 0.15]
    for _, p in groups["matrix"] + groups["embedding"] + groups["scalar"]:
        p.grad = torch.randn_like(p)
    before = {id(p): p.detach().clone() for _, p in groups["matrix"] + groups["scalar"]}
    for opt in (muon, adam):
        opt.step()
    assert all(not torch.equal(before[id(p)], p.detach()) for _, p in groups["matrix"] + groups["scalar"])


def test_build_optimizers_leaves_out_empty_groups():
    groups = _groups()
    (adam,) = build_optimizers({"embedding": groups["embedding"], "matrix": []}, OptimConfig())
    assert isinstance(adam, torch.optim.AdamW) and [g["name"] for g in adam.param_groups] == ["embedding"]
    (muon,) = build_optimizers({"matrix": groups["matrix"]}, OptimConfig())
    assert isinstance(muon, Muon)
    with pytest.raises(ValueError, match="no parameters"):
        build_optimizers({}, OptimConfig())


def test_build_optimizers_errors_name_the_parameter():
    groups = _groups()
    with pytest.raises(ValueError, match="unknown group"):
        build_optimizers({**groups, "bias": []}, OptimConfig())
    with pytest.raises(ValueError, match=r"'gain' has shape \(4,\), expected a 2-D matrix"):
        build_optimizers({**groups, "matrix": groups["matrix"] + groups["scalar"][:1]}, OptimConfig())
    with pytest.raises(ValueError, match=r"'again' \(scalar\) is the same tensor as 'emb' \(embedding\)"):
        build_optimizers({**groups, "scalar": [("again", groups["embedding"][0][1])]}, OptimConfig())
    with pytest.raises(ValueError, match=r"expected a \(name, parameter\) pair"):
        build_optimizers({"scalar": [groups["scalar"][0][1]]}, OptimConfig())


def test_set_lr_multiplier_errors():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=0.1)
    with pytest.raises(ValueError, match="no 'initial_lr'"):
        set_lr_multiplier([opt], 0.5)
    with pytest.raises(ValueError, match="finite number >= 0"):
        set_lr_multiplier([opt], -1.0)
    with pytest.raises(ValueError, match="finite number >= 0"):
        set_lr_multiplier([opt], float("nan"))


def test_allreduce_grads_is_a_noop_on_one_process():
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.arange(3.0)
    optim.allreduce_grads([p])
    assert torch.equal(p.grad, torch.arange(3.0))


# --------------------------------------------------------------------------------------------------------------
# Distributed: 2 gloo ranks with half the batch each == 1 process with the whole batch
# --------------------------------------------------------------------------------------------------------------


def _load_worker():
    spec = importlib.util.spec_from_file_location("dist_optim_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # three Python processes import torch: ~10 s on an idle 2-core machine
def test_two_ranks_match_one_process(tmp_path):
    worker = _load_worker()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2",
        str(WORKER), "--out", str(tmp_path),
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    for mode in worker.MODES:
        single = worker.train(mode)
        ranks = [np.load(tmp_path / f"{mode}_rank{r}.npz") for r in range(2)]
        assert set(ranks[0].files) == set(single)
        torch.manual_seed(1234)
        initial = {n: p.detach().numpy() for n, p in worker.TinyNet().named_parameters()}
        for name, expected in single.items():
            assert not np.allclose(expected, initial[name], atol=1e-4), f"{mode}: {name} did not train"
            np.testing.assert_array_equal(ranks[0][name], ranks[1][name], err_msg=f"{mode}: ranks disagree on {name}")
            np.testing.assert_allclose(ranks[0][name], expected, rtol=1e-6, atol=5e-6, err_msg=f"{mode}: {name}")


# --------------------------------------------------------------------------------------------------------------
# GPU
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bf16_newton_schulz_on_cuda_tracks_float32():
    G = torch.randn(6, 256, 128, generator=torch.Generator().manual_seed(0))
    O32 = newton_schulz(G, "polar_express", 5)
    O16 = newton_schulz(G.cuda(), "polar_express", 5)
    assert O16.dtype == torch.bfloat16
    rel = (O16.float().cpu() - O32).norm() / O32.norm()
    assert rel < 0.05, rel
    p = torch.nn.Parameter(torch.randn(256, 128, device="cuda"))
    opt = Muon([p], lr=0.01)
    p.grad = torch.randn_like(p)
    opt.step()
    assert torch.isfinite(p).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("precision", ["record_bf16", "fp32_momentum"])
def test_a_training_step_never_waits_for_the_gpu(precision):
    """No host sync in a step (micro-batches, clip, Muon, AdamW): one would drain the GPU's queue, and the host's
    Python time after it becomes idle GPU time (issue 16). torch's sync debug mode turns any sync into an error."""
    import dataclasses

    from pgolf.config import ModelConfig, OptimConfig
    from pgolf.model.gpt import GPT, param_groups
    from pgolf.train.step import forward_backward, optimizer_step
    from pgolf.train.storage import apply_param_storage

    cfg = ModelConfig(vocab_size=512, num_layers=4, model_dim=128, num_heads=4, num_kv_heads=2, rope_dims=8,
                      xsa_last_n=4, loop_start=1, loop_end=2, loop_count=2, parallel_residual_start=2,
                      attention_backend="torch")
    torch.manual_seed(0)
    device = torch.device("cuda")
    model = GPT(cfg, train_seq_len=256).to(device)
    model.looping = True
    groups = param_groups(model)
    apply_param_storage(model, "record", [n for n, _ in groups["embedding"]])
    optim_cfg = dataclasses.replace(OptimConfig(), muon_precision=precision, adam_fused="always")
    optimizers = build_optimizers(groups, optim_cfg)
    params = list(model.parameters())
    inputs = torch.randint(2, 512, (1024,)).pin_memory()
    inputs[::300] = 1  # a BOS every 300 tokens
    targets = torch.roll(inputs, -1).pin_memory()
    cu_seqlens = torch.tensor([0, 300, 600, 900, 1024, 1024, 1024, 1024], dtype=torch.int32).pin_memory()

    def step():
        for _ in range(2):
            forward_backward(model, inputs, targets, cu_seqlens, 300, 2, device, compiled=False)
        optimizer_step(params, optimizers, 0.3, None, clip_scope="per_rank")

    step()  # the first step creates the optimizers' state
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert all(torch.isfinite(p).all() for p in params)
