"""CUDA graphs for the training micro-batch (``train.cuda_graphs``): the compiled forward and backward of one
micro-batch captured once per shape and replayed for every later micro-batch of that shape.

Why: with FlashAttention 4 on one H200 the GPU sat idle about 46 ms of a 586 ms step (docs/benchmarks.md): the
host, launching some thousand kernels per micro-batch (inductor's wrappers, FlashAttention 4's per-call Python
configuration, the custom ops), fell behind the kernels. A replay launches a whole micro-batch in one call (one
H100, where the kernels already set the pace: 4-8 ms a step).

What a replay computes is what the eager call computes: the same compiled graph's kernels, in the same order, on
the same parameters (graphs read them in place; nothing here rebinds ``p.data``). One difference in form: the first
micro-batch of a step adds its gradient into a zeroed buffer where the eager call hands over the tensor itself
(``0 + g == g``; only the sign of a zero can differ).

How (per key = tokens, cu_seqlens length, max_seqlen, ``model.looping``, ``model.training``; anything else the
compiled forward branches on must not change while graphs are held):

- the first micro-batch of a key runs eagerly: it compiles, autotunes and JIT-compiles FlashAttention 4, and tells
  which parameters get a gradient (their ``.grad`` appears or its version moves). The training loop's compile passes
  go through :meth:`MicroBatchGraphs.eager`, so with ``train.warmup_cu_passes > 0`` every key of both loop states has
  run eagerly before the first capture;
- a key whose sibling (the same key but for the cu_seqlens length, which the compiled graph takes as a dynamic size)
  has run eagerly needs no eager run of its own: the sibling's graph is compiled and touches the same parameters;
- the next micro-batch of a key is captured on a side stream into one memory pool shared by every key (replays never
  overlap), then replayed; every later one is copied into the key's static input buffers and replayed;
- memory: an eager micro-batch allocates its activations outside the pool, so one that runs after a capture holds
  both (``eager_micro_batches_beside_pool`` in the summary counts them; the record recipe's warm-up has none);
- gradients: a captured AccumulateGrad adds into the ``.grad`` tensor present at capture, so each parameter a graph
  touches keeps one persistent gradient buffer, bound as ``p.grad`` before every replay (zeroed when ``p.grad`` is
  None after ``zero_grad(set_to_none=True)``, given ``p.grad``'s value when an eager call left another tensor
  there). Parameters no graph touches keep ``None``, so optimizers skip them as they would without graphs. Under
  ``train.fused_grad_accumulation`` (pgolf.train.grad_fusion) the captured backward adds into the step model's own
  buffers instead, and the step model's probe says which parameters a key touches;
- a capture that fails (a host sync inside the model, an op CUDA graphs refuse) is reported once; from then on
  nothing more is captured: keys captured before keep replaying, every other micro-batch runs eagerly, never
  wrongly.

``make_graph`` builds the capture/replay object (default: :class:`CudaGraph`); CPU tests pass one that re-runs the
captured function eagerly, to check the keys, the static inputs and the gradient binding without a GPU.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from pgolf.train.grad_fusion import FusedGradAccumulation, bind_grad_buffers
from pgolf.train.step import forward_backward


class CudaGraph:
    """One ``torch.cuda.CUDAGraph``: ``capture(fn)`` records fn (on ``stream``, into ``pool``), ``replay()`` runs it.

    ``capture_error_mode="thread_local"``: the prefetch thread pins host memory while the main thread captures,
    which the default global mode would count as an illegal call inside the capture."""

    def __init__(self, device: torch.device, pool: Any, stream: "torch.cuda.Stream"):
        self.device, self.pool_handle, self.stream = device, pool, stream
        self.graph = torch.cuda.CUDAGraph()

    def capture(self, fn: Callable[[], Tensor]) -> Tensor:
        torch.cuda.synchronize(self.device)
        with torch.cuda.graph(self.graph, pool=self.pool_handle, stream=self.stream, capture_error_mode="thread_local"):
            out = fn()
        return out

    def replay(self) -> None:
        self.graph.replay()

    def pool(self) -> Any:
        return self.graph.pool()


@dataclass
class _Captured:
    graph: Any
    inputs: Tensor  # [n] int64, static: every replay reads its micro-batch from here
    targets: Tensor  # [n] int64
    cu_seqlens: Tensor  # [m] int32
    loss: Tensor  # [] the captured forward's loss (its memory is rewritten by every replay)
    touched: tuple[int, ...]  # indices into MicroBatchGraphs.params of the parameters the graph accumulates into


class MicroBatchGraphs:
    """``runner(inputs, targets, cu_seqlens, max_seqlen) -> loss``: :func:`pgolf.train.step.forward_backward` through
    CUDA graphs (module docstring). Inputs are CPU tensors (pinned on CUDA) or device tensors."""

    def __init__(
        self,
        step_model: torch.nn.Module,
        model: torch.nn.Module,
        device: torch.device,
        grad_accum_steps: int,
        compiled: bool,
        make_graph: Optional[Callable[[Any], Any]] = None,
    ):
        self.step_model, self.model, self.device = step_model, model, device
        self.grad_accum_steps, self.compiled = grad_accum_steps, compiled
        self.params = [p for p in model.parameters() if p.requires_grad]
        if make_graph is None:
            stream = torch.cuda.Stream(device)
            make_graph = lambda pool: CudaGraph(device, pool, stream)  # noqa: E731
        self.make_graph = make_graph
        self.pool: Any = None
        self.grad_buffers: dict[int, Tensor] = {}  # param index -> its persistent gradient
        # under train.fused_grad_accumulation the compiled backward adds into the step model's own buffers, and
        # the step model knows which parameters a key touches (no AccumulateGrad moves a .grad's version)
        self.fused = step_model if isinstance(step_model, FusedGradAccumulation) else None
        if self.fused is not None:
            self.grad_buffers = self.fused.buffer_by_index
        self.touched: dict[tuple, tuple[int, ...]] = {}  # key -> params its eager call accumulated into
        self.captured: dict[tuple, _Captured] = {}
        self.eager_calls = 0
        self.eager_beside_pool = 0  # eager micro-batches run while the pool held the captured graphs' memory
        self.replays = 0
        self.failure: Optional[str] = None

    def key(self, inputs: Tensor, cu_seqlens: Tensor, max_seqlen: int) -> tuple:
        return (int(inputs.numel()), int(cu_seqlens.numel()), int(max_seqlen), bool(getattr(self.model, "looping", False)),
                bool(self.model.training))

    def __call__(self, inputs: Tensor, targets: Tensor, cu_seqlens: Tensor, max_seqlen: int) -> Tensor:
        key = self.key(inputs, cu_seqlens, max_seqlen)
        entry = self.captured.get(key)
        if entry is None and self.failure is None:
            touched = self._known_touched(key)
            if touched is not None:
                entry = self._capture(key, touched, inputs, targets, cu_seqlens, max_seqlen)
        if entry is None:
            return self.eager(inputs, targets, cu_seqlens, max_seqlen)
        self._bind(entry.touched)
        self._load(entry, inputs, targets, cu_seqlens)
        entry.graph.replay()
        self.replays += 1
        return entry.loss.clone()  # the next replay rewrites entry.loss

    def _known_touched(self, key: tuple) -> Optional[tuple[int, ...]]:
        """The parameters key's graph accumulates into, if an eager run of key or of a sibling told."""
        if key in self.touched:
            return self.touched[key]
        sibling = next((k for k in self.touched if k[:1] + k[2:] == key[:1] + key[2:]), None)
        return None if sibling is None else self.touched[sibling]

    def eager(self, inputs: Tensor, targets: Tensor, cu_seqlens: Tensor, max_seqlen: int) -> Tensor:
        """:func:`forward_backward` without graphs; learns which parameters the micro-batch's key touches."""
        key = self.key(inputs, cu_seqlens, max_seqlen)
        self.eager_beside_pool += self.pool is not None
        before = self._grad_versions() if self.fused is None else None
        loss = forward_backward(self.step_model, inputs, targets, cu_seqlens, max_seqlen, self.grad_accum_steps,
                                self.device, self.compiled)
        if self.fused is not None:  # its probe told which parameters this state uses
            touched = self.fused.touched[self.fused.state()]
        else:  # the parameters whose .grad AccumulateGrad created or added into
            touched = tuple(i for i, (b, a) in enumerate(zip(before, self._grad_versions())) if a is not None and a != b)
        self.touched.setdefault(key, touched)
        self.eager_calls += 1
        return loss

    def _grad_versions(self) -> list[Optional[tuple[int, int]]]:
        """(identity, version) of each parameter's .grad, None where there is none."""
        return [None if p.grad is None else (id(p.grad), p.grad._version) for p in self.params]

    def _bind(self, touched: tuple[int, ...]) -> None:
        """Make each touched parameter's ``.grad`` its persistent buffer, holding the gradient accumulated so far."""
        bind_grad_buffers(self.params, self.grad_buffers, touched)

    def _load(self, entry: _Captured, inputs: Tensor, targets: Tensor, cu_seqlens: Tensor) -> None:
        for static, value in ((entry.inputs, inputs), (entry.targets, targets), (entry.cu_seqlens, cu_seqlens)):
            if value.device.type == "cpu" and self.device.type == "cuda" and not value.is_pinned():
                value = value.pin_memory()  # the copy below is then asynchronous
            static.copy_(value, non_blocking=True)

    def _capture(self, key: tuple, touched: tuple[int, ...], inputs: Tensor, targets: Tensor, cu_seqlens: Tensor,
                 max_seqlen: int) -> Optional[_Captured]:
        static = [torch.empty(t.shape, dtype=t.dtype, device=self.device) for t in (inputs, targets, cu_seqlens)]
        self._bind(touched)  # the captured AccumulateGrad nodes add into these very tensors
        graph = self.make_graph(self.pool)

        def step() -> Tensor:  # the eager call's function on the static inputs (already on the device: no copies)
            return forward_backward(self.step_model, *static, max_seqlen, self.grad_accum_steps, self.device,
                                    self.compiled)

        try:
            loss = graph.capture(step)
        except Exception as exc:  # training goes on eagerly, never wrongly
            self.failure = f"{key}: {type(exc).__name__}: {str(exc).strip().splitlines()[-1][:300] if str(exc) else ''}"
            print(f"warning: CUDA graph capture of a training micro-batch failed ({self.failure}); micro-batches "
                  "run eagerly from here on", file=sys.stderr)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            return None
        self.pool = graph.pool()
        entry = _Captured(graph, static[0], static[1], static[2], loss, touched)
        self.captured[key] = entry
        return entry

    def pool_bytes(self) -> int:
        """Bytes of device memory the graphs' pool holds (activations and workspace live there, not in the
        allocator's ``max_memory_allocated`` of a replayed step); 0 without a pool or CUDA."""
        if self.pool is None or self.device.type != "cuda":
            return 0
        pool_id = tuple(self.pool)
        return sum(int(s["total_size"]) for s in torch.cuda.memory._snapshot(self.device)["segments"]
                   if tuple(s.get("segment_pool_id", (0, 0))) == pool_id)

    def summary(self) -> dict[str, Any]:
        return {"cuda_graphs_captured": len(self.captured), "cuda_graph_replays": self.replays,
                "eager_micro_batches": self.eager_calls, "eager_micro_batches_beside_pool": self.eager_beside_pool,
                "cuda_graph_failure": self.failure,
                "graph_pool_gib": self.pool_bytes() / 2**30}
