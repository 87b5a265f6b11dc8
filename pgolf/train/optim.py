"""Optimizers of the training stage: Muon for the 2-D matrices, AdamW for the embedding and the scalars.

The record (record.md, "Training") splits the parameters three ways (``pgolf.model.gpt.param_groups``):

- ``matrix``: every 2-D weight matrix -> :class:`Muon`, lr ``matrix_lr`` and decoupled weight decay;
- ``embedding``: the tied embedding -> ``torch.optim.AdamW`` with ``embed_lr`` / ``embed_weight_decay``;
- ``scalar``: gains, gates, mixing weights -> ``torch.optim.AdamW`` with ``scalar_lr`` / ``scalar_weight_decay``.

Muon, for one matrix ``W`` of shape ``[rows, cols]`` with gradient ``G`` (all ranks' gradients averaged), at the
optimizer's own step ``t`` (0 on the first step)::

    mu_t  = start + (end - start) * min(t / warmup_steps, 1)     momentum warm-up (linear)
    M     = mu_t * M + G                                         momentum buffer (M_0 = 0)
    U     = G + mu_t * M        (Nesterov)     or   U = M        (plain heavy ball)
    U     = U / ||U_row||_2                                      each row, optional ("MuonEq-R")
    O     = NS(U)                                                approximately the polar factor U (U^T U)^-1/2
    W     = W * (1 - lr * wd)                                    decoupled weight decay (group lr, see below)
    W     = W - lr * max(1, rows / cols) ** 0.5 * O

``NS`` is the Newton-Schulz iteration of :func:`newton_schulz`. Its output has all singular values near 1
whatever the gradient's spectrum, so the update has a fixed "size" per direction: the lr is a step length in
spectral norm. The ``sqrt(rows / cols)`` factor keeps the RMS of the update per entry comparable between tall
matrices (whose ``cols`` orthonormal columns spread over more rows) and square or wide ones.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterable, Mapping, Sequence, Union

import torch
import torch.distributed as dist
from torch import Tensor

from pgolf.config import OptimConfig
from pgolf.train.muon_bf16 import newton_schulz_bf16, polar_iterations, row_normalize_bf16

Coeffs = tuple[float, float, float]

# Per-step (a, b, c) of the "Polar Express" schedule, verbatim from record.md: step i of 5 uses tuple i.
POLAR_EXPRESS_COEFFS: tuple[Coeffs, ...] = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
# The single tuple older records apply at every step.
FIXED_NS_COEFFS: Coeffs = (3.4445, -4.7750, 2.0315)

NS_NORM_EPS = 1e-7  # added to the Frobenius norm before dividing, so an all-zero update stays zero
ROW_NORM_EPS = 1e-7  # added to each row's L2 norm in MuonEq-R, for the same reason

GROUP_NAMES = ("matrix", "embedding", "scalar")
MUON_PRECISIONS = ("fp32_momentum", "record_bf16")  # see OptimConfig.muon_precision

NamedParams = Sequence[tuple[str, torch.nn.Parameter]]
CoeffSpec = Union[str, Coeffs, Sequence[Coeffs]]


# --------------------------------------------------------------------------------------------------------------
# Newton-Schulz orthogonalization (pure)
# --------------------------------------------------------------------------------------------------------------


def ns_coefficient_schedule(coeffs: CoeffSpec, steps: int) -> tuple[Coeffs, ...]:
    """The (a, b, c) used at each of ``steps`` Newton-Schulz steps.

    ``coeffs`` is ``"polar_express"`` (tuple i at step i, so at most 5 steps), ``"fixed"`` (FIXED_NS_COEFFS at
    every step), one (a, b, c) triple (used at every step) or a sequence of at least ``steps`` triples.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"ns steps: expected an int >= 1, got {steps!r}")
    if isinstance(coeffs, str):
        if coeffs == "polar_express":
            coeffs = POLAR_EXPRESS_COEFFS
        elif coeffs == "fixed":
            coeffs = FIXED_NS_COEFFS
        else:
            raise ValueError(f"ns coefficients: expected 'polar_express', 'fixed' or (a, b, c) tuples, got {coeffs!r}")
    if len(coeffs) == 3 and all(isinstance(v, (int, float)) for v in coeffs):
        return (tuple(float(v) for v in coeffs),) * steps  # type: ignore[return-value]
    schedule = []
    for i, triple in enumerate(coeffs):
        if len(triple) != 3 or not all(isinstance(v, (int, float)) for v in triple):
            raise ValueError(f"ns coefficients[{i}]: expected an (a, b, c) triple of numbers, got {triple!r}")
        schedule.append(tuple(float(v) for v in triple))
    if len(schedule) < steps:
        raise ValueError(f"ns coefficients: {len(schedule)} (a, b, c) tuples cannot cover {steps} steps")
    return tuple(schedule[:steps])  # type: ignore[return-value]


def default_compute_dtype(x: Tensor) -> torch.dtype:
    """bf16 on CUDA (tensor cores; the iteration tolerates it), else float32 (float64 stays float64)."""
    if x.is_cuda:
        return torch.bfloat16
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def newton_schulz(
    G: Tensor,
    coeffs: CoeffSpec,
    steps: int,
    *,
    compute_dtype: torch.dtype | None = None,
    eps: float = NS_NORM_EPS,
) -> Tensor:
    """Map each matrix of ``G`` [..., rows, cols] to (approximately) its orthogonal polar factor.

    With ``G = U S V^T`` the exact answer is ``U V^T``; computing it by SVD is slow on GPUs, so we run an odd
    matrix polynomial instead. Each step maps every singular value s to ``a s + b s^3 + c s^5``::

        X <- X / (||X||_F + eps)                 singular values now in [0, 1]
        X <- X^T if rows > cols                  so A below is the small [min, min] Gram matrix
        repeat: A = X X^T;  X <- a X + (b A + c A^2) X
        X <- X^T if it was transposed

    The fixed tuple drives singular values into roughly [0.7, 1.2]; the Polar Express schedule (a different
    tuple per step, optimized for 5 steps) into roughly [0.86, 1.14] from as low as 1e-3.

    Leading dimensions are a batch: matrices of one shape are orthogonalized in one call. Computes in
    ``compute_dtype`` (default: :func:`default_compute_dtype`) and returns that dtype; the norm is taken in
    float32 (float64 for float64 input) before the cast.
    """
    if G.ndim < 2:
        raise ValueError(f"newton_schulz: expected a tensor [..., rows, cols], got shape {tuple(G.shape)}")
    schedule = ns_coefficient_schedule(coeffs, steps)
    dtype = compute_dtype or default_compute_dtype(G)
    norm_dtype = torch.float64 if G.dtype == torch.float64 else torch.float32
    X = G.to(norm_dtype)
    X = X / (torch.linalg.matrix_norm(X, ord="fro", keepdim=True) + eps)  # [..., rows, cols]
    X = X.to(dtype)
    transposed = G.size(-2) > G.size(-1)
    if transposed:
        X = X.mT  # [..., cols, rows]: now rows <= cols
    X = polar_iterations(X, schedule)
    return X.mT if transposed else X


def row_normalize(U: Tensor, eps: float = ROW_NORM_EPS) -> Tensor:
    """Divide each row of U [..., rows, cols] by its L2 norm ("MuonEq-R"): every output row gets equal weight
    before orthogonalization, so rows with large gradients no longer dominate the polar factor."""
    return U / (torch.linalg.vector_norm(U, dim=-1, keepdim=True) + eps)


def muon_momentum_at(step: int, start: float, end: float, warmup_steps: int) -> float:
    """Momentum for the optimizer's step ``step`` (0-based): linear from ``start`` (step 0) to ``end`` (step
    ``warmup_steps`` and later). A low early momentum lets the first, large gradients move weights quickly.

    Written as the weighted mean ``(1 - f) * start + f * end`` (the record's form): ``start + (end - start) * f``
    is the same number in exact arithmetic but not always in doubles, and bf16 momentum makes the last bit count.
    """
    if warmup_steps <= 0:
        return end
    frac = min(step / warmup_steps, 1.0)
    return (1.0 - frac) * start + frac * end


def lr_shape_scale(rows: int, cols: int) -> float:
    """Muon's per-matrix lr factor ``max(1, rows / cols) ** 0.5``."""
    return max(1.0, rows / cols) ** 0.5


# --------------------------------------------------------------------------------------------------------------
# Distributed helpers
# --------------------------------------------------------------------------------------------------------------


def _world(process_group=None) -> tuple[int, int]:
    """(world_size, rank) of the default or given process group; (1, 0) when torch.distributed is not in use."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(process_group), dist.get_rank(process_group)
    return 1, 0


def allreduce_mean_(tensors: Sequence[Tensor], process_group=None) -> None:
    """Average ``tensors`` in place over all ranks, in one all_reduce per (device, dtype): the sum, then a division
    in the tensors' own dtype (bf16 tensors are averaged in bf16, as the record's bf16 collectives do).

    Many small tensors (gains, gates) cost one collective's latency each when reduced one by one; flattening
    them into a single buffer costs one latency in all ("grouped all-reduce of small params"). Every rank must
    pass the same tensors in the same order, or the flat buffers would not line up. No-op on a single process.
    """
    world, _ = _world(process_group)
    if world == 1:
        return
    buckets: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for t in tensors:
        if t.is_sparse:
            raise ValueError(f"allreduce: sparse gradients are not supported (shape {tuple(t.shape)})")
        buckets.setdefault((t.device, t.dtype), []).append(t)
    for group in buckets.values():
        flat = torch.cat([t.reshape(-1) for t in group])  # [sum of numels]
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=process_group)
        flat.div_(world)
        for t, chunk in zip(group, flat.split([t.numel() for t in group])):
            t.copy_(chunk.view_as(t))


def allreduce_grads(params: Iterable[Tensor], process_group=None) -> None:
    """Average the ``.grad`` of ``params`` over all ranks (:func:`allreduce_mean_`); params without a grad are
    skipped (every rank has grads on the same parameters for a fixed model graph)."""
    allreduce_mean_([p.grad for p in params if p.grad is not None], process_group)


# --------------------------------------------------------------------------------------------------------------
# Muon
# --------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Bucket:
    """Matrices of one param group with one shape, device and dtype: orthogonalized in one batched call.

    ``owners[i]`` is the rank that orthogonalizes ``params[i]``; ``slots[i]`` its position among that owner's
    matrices of this bucket. Every rank reserves ``slots_per_rank`` matrices of the bucket in its gather buffer.
    A parameter may be a stack of matrices [..., rows, cols] (the record's banks): it is one item here.
    """

    group: dict
    params: list[Tensor]
    owners: list[int]
    slots: list[int]
    slots_per_rank: int

    @property
    def param_shape(self) -> tuple[int, ...]:
        return tuple(self.params[0].shape)

    @property
    def matrix_shape(self) -> tuple[int, int]:
        return tuple(self.params[0].shape[-2:])  # type: ignore[return-value]


def _plan_buckets(groups: Sequence[dict], world: int) -> list[_Bucket]:
    """Bucket the matrices that have grads by (group, shape, device, dtype) and deal them to ranks.

    Ownership is round-robin over all matrices in bucket order, continuing across buckets, so a bucket of 11
    matrices on 8 ranks does not always land its extra 3 on ranks 0-2. Deterministic given the parameter
    order, so every rank computes the same plan without communicating.
    """
    buckets: list[_Bucket] = []
    cursor = 0
    for group in groups:
        by_key: dict[tuple, list[Tensor]] = {}
        for p in group["params"]:
            if p.grad is not None:
                if p.grad.is_sparse:
                    raise ValueError(f"Muon: sparse gradients are not supported (shape {tuple(p.shape)})")
                by_key.setdefault((tuple(p.shape), p.device, p.dtype), []).append(p)
        for params in by_key.values():
            owners = [(cursor + i) % world for i in range(len(params))]
            seen = [0] * world
            slots = []
            for owner in owners:
                slots.append(seen[owner])
                seen[owner] += 1
            buckets.append(_Bucket(group, params, owners, slots, max(seen)))
            cursor += len(params)
    return buckets


class Muon(torch.optim.Optimizer):
    """Momentum + Newton-Schulz orthogonalization for 2-D matrices (math in the module docstring). A parameter
    may also be a stack [..., rows, cols] of matrices (as the record stores its banks): each trailing matrix is
    orthogonalized on its own, exactly as if it were a parameter of its own.

    Param group keys: ``lr``, ``momentum`` (the value after warm-up), ``momentum_warmup_start`` (None: no
    warm-up), ``momentum_warmup_steps``, ``nesterov``, ``row_normalize``, ``ns_steps``, ``ns_coefficients``
    (resolved (a, b, c) tuples), ``weight_decay``, and ``step`` (this optimizer's step count for the group,
    which drives the momentum warm-up and travels in ``state_dict``).

    Weight decay is ``W *= 1 - lr * wd`` with the group's *current* lr (``initial_lr`` times the schedule
    multiplier), not the shape-scaled one: the decay follows the lr schedule exactly as AdamW's does for the
    other groups (one ``wd`` knob means the same thing everywhere), and every matrix shrinks at the same rate
    whatever its aspect ratio.

    Distributed (torch.distributed initialized, world size > 1): gradients are averaged with one flat
    all_reduce (skipped with ``average_grads=False`` when the caller already did it, e.g. to clip by the global
    norm); momentum is then updated on every rank (cheap, elementwise, keeps the state replicated and the
    ``state_dict`` identical on all ranks and across world sizes); each rank orthogonalizes only the matrices it
    owns (:func:`_plan_buckets`), one batched call per shape bucket; one all_gather shares the results, and
    every rank applies the same update to every matrix. No DDP wrapper is needed for these parameters.

    ``precision`` (``OptimConfig.muon_precision``): ``fp32_momentum`` keeps the gradient and momentum in the
    parameter's dtype (fp32) and normalizes in fp32; ``record_bf16`` is PR #1855's arithmetic: the gradient rounded
    to bf16 (averaged over ranks in bf16), bf16 momentum and Nesterov sum, and :mod:`pgolf.train.muon_bf16`'s
    rounding order for the row norm and Newton-Schulz; the update is added to the fp32 parameter.
    """

    def __init__(
        self,
        params,
        lr: float,
        momentum: float = 0.97,
        momentum_warmup_start: float | None = None,
        momentum_warmup_steps: int = 0,
        nesterov: bool = True,
        row_normalize: bool = True,
        ns_steps: int = 5,
        ns_coefficients: CoeffSpec = "polar_express",
        weight_decay: float = 0.0,
        *,
        precision: str = "fp32_momentum",
        average_grads: bool = True,
        process_group=None,
    ) -> None:
        if precision not in MUON_PRECISIONS:
            raise ValueError(f"Muon: precision: expected one of {MUON_PRECISIONS}, got {precision!r}")
        if not (lr >= 0.0 and math.isfinite(lr)):
            raise ValueError(f"Muon: lr: expected a finite number >= 0, got {lr!r}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"Muon: momentum: expected 0 <= momentum < 1, got {momentum!r}")
        if momentum_warmup_start is not None and not 0.0 <= momentum_warmup_start < 1.0:
            raise ValueError(f"Muon: momentum_warmup_start: expected 0 <= value < 1, got {momentum_warmup_start!r}")
        if momentum_warmup_steps < 0:
            raise ValueError(f"Muon: momentum_warmup_steps: expected >= 0, got {momentum_warmup_steps!r}")
        if not weight_decay >= 0.0:
            raise ValueError(f"Muon: weight_decay: expected >= 0, got {weight_decay!r}")
        defaults = dict(
            lr=lr,
            momentum=momentum,
            momentum_warmup_start=momentum_warmup_start,
            momentum_warmup_steps=momentum_warmup_steps,
            nesterov=nesterov,
            row_normalize=row_normalize,
            ns_steps=ns_steps,
            ns_coefficients=ns_coefficients,
            weight_decay=weight_decay,
            step=0,
        )
        super().__init__(params, defaults)
        for gi, group in enumerate(self.param_groups):
            group["ns_coefficients"] = ns_coefficient_schedule(group["ns_coefficients"], group["ns_steps"])
            for pi, p in enumerate(group["params"]):
                if p.ndim < 2:
                    raise ValueError(
                        f"Muon: param_groups[{gi}] param {pi}: expected a 2-D matrix, got shape {tuple(p.shape)} "
                        "(or a stack of matrices [..., rows, cols])"
                    )
        self.precision = precision
        self.average_grads = average_grads
        self.process_group = process_group

    @staticmethod
    def group_momentum(group: Mapping) -> float:
        """The momentum the next step of ``group`` will use (warm-up applied)."""
        start = group["momentum_warmup_start"]
        if start is None:
            return group["momentum"]
        return muon_momentum_at(group["step"], start, group["momentum"], group["momentum_warmup_steps"])

    def _orthogonalize(self, bucket: _Bucket, updates: list[Tensor]) -> Tensor:
        """Row-normalize (optional) and Newton-Schulz a stack of updates [n, ..., rows, cols] in one call."""
        U = torch.stack(updates)  # [n, ..., rows, cols]
        group = bucket.group
        if self.precision == "record_bf16":
            if group["row_normalize"]:
                U = row_normalize_bf16(U)
            return newton_schulz_bf16(U, group["ns_coefficients"], NS_NORM_EPS)
        if group["row_normalize"]:
            U = row_normalize(U)
        return newton_schulz(U, group["ns_coefficients"], group["ns_steps"])

    def _gradients(self, world: int) -> dict[int, Tensor]:
        """id(param) -> the gradient its update uses: ``p.grad`` (fp32_momentum) or a bf16 copy (record_bf16),
        averaged over ranks unless the caller already did (``average_grads=False``)."""
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        if self.precision == "record_bf16":
            grads = [p.grad.to(torch.bfloat16) for p in params]
        else:
            grads = [p.grad for p in params]
        if world > 1 and self.average_grads:
            allreduce_mean_(grads, self.process_group)
        return {id(p): g for p, g in zip(params, grads)}

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        world, rank = _world(self.process_group)
        grad_of = self._gradients(world)

        buckets = _plan_buckets(self.param_groups, world)
        if not buckets:
            return loss

        # 1. Momentum on every matrix (replicated); the update direction only for the matrices this rank owns.
        owned_results: list[Tensor | None] = []
        for bucket in buckets:
            group = bucket.group
            mu = self.group_momentum(group)
            grads = [grad_of[id(p)] for p in bucket.params]
            bufs = []
            for p, g in zip(bucket.params, grads):
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(g)  # the gradient's dtype: bf16 under record_bf16
                bufs.append(state["momentum_buffer"])
            # bf16 buffers one tensor at a time: the foreach kernels round the scalar mu to bf16 before multiplying
            # (0.92003 -> 0.921875), the in-place ops the record uses keep it in fp32
            per_tensor = self.precision == "record_bf16"
            if per_tensor:
                for buf, g in zip(bufs, grads):
                    buf.mul_(mu).add_(g)  # M = mu * M + G
            else:
                torch._foreach_mul_(bufs, mu)
                torch._foreach_add_(bufs, grads)  # M = mu * M + G
            mine = [i for i, owner in enumerate(bucket.owners) if owner == rank]
            if not mine:
                owned_results.append(None)
                continue
            if group["nesterov"] and per_tensor:
                updates = [grads[i].add(bufs[i], alpha=mu) for i in mine]
            elif group["nesterov"]:
                updates = torch._foreach_add([grads[i] for i in mine], [bufs[i] for i in mine], alpha=mu)
            else:
                updates = [bufs[i] for i in mine]
            owned_results.append(self._orthogonalize(bucket, updates))  # [len(mine), ..., rows, cols]
        for group in self.param_groups:
            if any(p.grad is not None for p in group["params"]):
                group["step"] += 1

        # 2. Share: every rank writes its results into a flat send buffer laid out the same on all ranks (bucket b
        #    at [offset_b, offset_b + slots_per_rank * rows * cols)); one all_gather stacks them to [world, total].
        gather_dtype = torch.bfloat16 if self.precision == "record_bf16" else default_compute_dtype(buckets[0].params[0])
        if self.precision != "record_bf16" and any(default_compute_dtype(b.params[0]) != gather_dtype for b in buckets):
            raise ValueError(
                "Muon: all matrices must share one Newton-Schulz compute dtype: one kind of device (CPU or CUDA), "
                "and on CPU not float64 mixed with other dtypes"
            )
        offsets = []
        total = 0
        for bucket in buckets:
            offsets.append(total)
            total += bucket.slots_per_rank * math.prod(bucket.param_shape)
        device = buckets[0].params[0].device
        send = torch.zeros(total, dtype=gather_dtype, device=device)  # [total]; padding slots stay 0
        for offset, result in zip(offsets, owned_results):
            if result is not None:
                send[offset : offset + result.numel()] = result.reshape(-1)
        if world == 1:
            gathered = send.view(1, total)  # [world=1, total]
        else:
            gathered = torch.empty(world, total, dtype=gather_dtype, device=device)  # [world, total]
            dist.all_gather(list(gathered.unbind(0)), send, group=self.process_group)

        # 3. Apply the same update on every rank.
        for bucket, offset in zip(buckets, offsets):
            group = bucket.group
            rows, cols = bucket.matrix_shape
            span = bucket.slots_per_rank * math.prod(bucket.param_shape)
            per_rank = gathered[:, offset : offset + span].view(world, bucket.slots_per_rank, *bucket.param_shape)
            # views picked by Python ints, stacked by one copy: indexing with the lists themselves would copy them
            # to the GPU as index tensors, a blocking copy that drains the GPU's queue once per bucket and step
            O = torch.stack([per_rank[o, s] for o, s in zip(bucket.owners, bucket.slots)])  # [n, ..., rows, cols]
            O = O.to(bucket.params[0].dtype)
            if group["weight_decay"] != 0.0:
                torch._foreach_mul_(bucket.params, 1.0 - group["lr"] * group["weight_decay"])
            step_size = group["lr"] * lr_shape_scale(rows, cols)
            torch._foreach_add_(bucket.params, list(O.unbind(0)), alpha=-step_size)
        return loss


# --------------------------------------------------------------------------------------------------------------
# Building the optimizers from the model's parameter groups
# --------------------------------------------------------------------------------------------------------------


def _check_groups(groups: Mapping[str, NamedParams]) -> None:
    unknown = sorted(set(groups) - set(GROUP_NAMES))
    if unknown:
        raise ValueError(f"param groups: unknown group(s) {', '.join(unknown)}; expected {', '.join(GROUP_NAMES)}")
    seen: dict[int, str] = {}
    for group_name, named in groups.items():
        for i, item in enumerate(named):
            if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], Tensor)):
                raise ValueError(f"param groups['{group_name}'][{i}]: expected a (name, parameter) pair, got {item!r:.80}")
            name, p = item
            if id(p) in seen:
                raise ValueError(f"param groups: '{name}' ({group_name}) is the same tensor as {seen[id(p)]}")
            seen[id(p)] = f"'{name}' ({group_name})"
            if group_name == "matrix" and p.ndim < 2:
                raise ValueError(
                    f"param groups['matrix']: '{name}' has shape {tuple(p.shape)}, expected a 2-D matrix for Muon"
                )


def build_optimizers(
    groups: Mapping[str, NamedParams], cfg: OptimConfig, *, muon_average_grads: bool = True
) -> list[torch.optim.Optimizer]:
    """Muon for ``groups["matrix"]``, one AdamW with param groups ``embedding`` and ``scalar``.

    Every param group carries ``initial_lr`` (its peak lr) and ``name``; :func:`set_lr_multiplier` scales from
    it. Empty groups are left out (an optimizer with no parameters is an error in torch). AdamW is fused on
    CUDA and the plain foreach implementation on CPU, or fused everywhere with ``adam_fused: always`` (the
    record's choice). Pass ``muon_average_grads=False`` when the training loop already averages every gradient
    (needed to clip by the global norm before the step).
    """
    _check_groups(groups)
    optimizers: list[torch.optim.Optimizer] = []
    matrices = [p for _, p in groups.get("matrix", ())]
    if matrices:
        muon = Muon(
            [{"params": matrices, "initial_lr": cfg.matrix_lr, "name": "matrix"}],
            lr=cfg.matrix_lr,
            momentum=cfg.muon_momentum,
            momentum_warmup_start=cfg.muon_momentum_warmup_start,
            momentum_warmup_steps=cfg.muon_momentum_warmup_steps,
            nesterov=cfg.muon_nesterov,
            row_normalize=cfg.muon_row_normalize,
            ns_steps=cfg.ns_steps,
            ns_coefficients=cfg.ns_coefficients,
            weight_decay=cfg.muon_weight_decay,
            precision=cfg.muon_precision,
            average_grads=muon_average_grads,
        )
        optimizers.append(muon)
    adam_groups = []
    for name, lr, wd in (
        ("embedding", cfg.embed_lr, cfg.embed_weight_decay),
        ("scalar", cfg.scalar_lr, cfg.scalar_weight_decay),
    ):
        params = [p for _, p in groups.get(name, ())]
        if params:
            adam_groups.append({"params": params, "lr": lr, "weight_decay": wd, "initial_lr": lr, "name": name})
    if adam_groups:
        on_cuda = all(p.is_cuda for g in adam_groups for p in g["params"])
        fused = on_cuda or cfg.adam_fused == "always"
        optimizers.append(
            torch.optim.AdamW(adam_groups, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps, fused=fused)
        )
    if not optimizers:
        raise ValueError("param groups: no parameters in 'matrix', 'embedding' or 'scalar'")
    return optimizers


def set_lr_multiplier(optimizers: Iterable[torch.optim.Optimizer], multiplier: float) -> None:
    """Set every param group's lr to ``initial_lr * multiplier`` (the schedule's multiplier for this step)."""
    if not (multiplier >= 0.0 and math.isfinite(multiplier)):
        raise ValueError(f"lr multiplier: expected a finite number >= 0, got {multiplier!r}")
    for opt in optimizers:
        for i, group in enumerate(opt.param_groups):
            if "initial_lr" not in group:
                raise ValueError(f"{type(opt).__name__}.param_groups[{i}]: no 'initial_lr' (build it with build_optimizers)")
            group["lr"] = group["initial_lr"] * multiplier


def set_step_index(optimizers: Iterable[torch.optim.Optimizer], step: int) -> None:
    """Make Muon's next step use the momentum warm-up of loop step ``step``.

    Muon counts its own steps, which equals the loop's step index in a plain run; the record's warm-up restarts
    the index at 0 for its looping-on half (and the real run again after the restore), so the loop sets it.
    """
    if step < 0:
        raise ValueError(f"step index: expected >= 0, got {step!r}")
    for opt in optimizers:
        if isinstance(opt, Muon):
            for group in opt.param_groups:
                group["step"] = step
