"""train.fused_grad_accumulation (pgolf.train.grad_fusion): gradients added into ``.grad`` by the backward itself
train as autograd's AccumulateGrad does. Eagerly (also through the CUDA graphs runner's CPU stand-in from
test_train_graphs, and through the training loop): the same losses and weights, bit for bit. Compiled by inductor
(CPU; the GPU test with real CUDA graphs): the matmul weights' gradients bit for bit, every other gradient to float32
rounding (a reduction inductor fuses with the add may be ordered differently). A parameter the forward never uses
keeps ``.grad`` None, so AdamW skips it as it would without the option.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from pgolf.train.grad_fusion import FusedGradAccumulation
from pgolf.train.graphs import MicroBatchGraphs
from pgolf.train.loop import build_step_model
from pgolf.train.step import forward_backward, optimizer_step
from test_train_graphs import PartlyUsed, RerunGraph, micro_batches, tiny_gpt
from test_train_graphs import train as train_steps
from eval_fixtures import TINY


def train(model, fused: bool, graphs: bool, steps: int = 4):
    """test_train_graphs' AdamW steps (looping on from step 2) through ``build_step_model``; returns (losses, step
    model)."""
    step_model = build_step_model(model, fused, lambda m: m)
    losses, _ = train_steps(model, graphs, steps=steps, loop_from=2, step_model=step_model)
    return losses, step_model


def assert_same_training(reference, other, ref_losses, other_losses):
    assert torch.equal(ref_losses, other_losses)
    for (name, a), b in zip(reference.named_parameters(), other.parameters()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graphs"])
@pytest.mark.parametrize("build", [tiny_gpt, lambda: PartlyUsed()], ids=["gpt", "partly_used"])
def test_fused_accumulation_trains_as_autograd_accumulation(build, graphs):
    torch.manual_seed(1)
    reference = build()
    fused = copy.deepcopy(reference)
    ref_losses, _ = train(reference, fused=False, graphs=graphs)
    fused_losses, step_model = train(fused, fused=True, graphs=graphs)
    assert isinstance(step_model, FusedGradAccumulation)
    assert_same_training(reference, fused, ref_losses, fused_losses)
    assert set(step_model.touched) == {(False, True), (True, True)}  # probed once per loop state


def test_an_unused_parameter_keeps_no_gradient_and_no_update():
    model = PartlyUsed()
    before = model.unused.detach().clone()
    _, step_model = train(model, fused=True, graphs=True)
    index = [id(p) for p in step_model.params].index(id(model.unused))
    assert all(index not in touched for touched in step_model.touched.values())
    assert model.unused.grad is None and torch.equal(model.unused, before)  # AdamW skipped it: no weight decay
    assert torch.count_nonzero(step_model.buffers[index]) == 0  # nothing ever added into its buffer


def test_the_gradient_lands_in_the_bound_buffer_and_autograd_gives_the_parameter_none():
    torch.manual_seed(0)
    model = tiny_gpt()
    step_model = build_step_model(model, True, lambda m: m)
    inputs, targets, cu = micro_batches(0, TINY.vocab_size)[0]
    forward_backward(step_model, inputs, targets, cu, 16, 1, torch.device("cpu"), False)
    grads_once = [p.grad.clone() for p in step_model.params]
    assert all(p.grad is buf for p, buf in zip(step_model.params, step_model.buffers))
    forward_backward(step_model, inputs, targets, cu, 16, 1, torch.device("cpu"), False)  # accumulates: 2 g
    for p, g in zip(step_model.params, grads_once):
        assert torch.equal(p.grad, g + g)


def compare_compiled_accumulation(device: torch.device, graphs: bool) -> None:
    """Two micro-batches' gradients, looping off and on, of the compiled model with and without fused accumulation:
    the large matmul weights (Linear; Embedding on CPU) bit for bit, every gradient to float32 rounding (see the
    callers)."""
    compile_fn = lambda m: torch.compile(m, fullgraph=True, dynamic=False, backend="inductor")  # noqa: E731
    torch.manual_seed(2)
    reference = tiny_gpt().to(device)
    fused = copy.deepcopy(reference)
    step_models = [build_step_model(reference, False, compile_fn), build_step_model(fused, True, compile_fn)]
    runners = [MicroBatchGraphs(step_model, model, device, 2, compiled=True) if graphs else None
               for model, step_model in zip((reference, fused), step_models)]
    batches = micro_batches(0, TINY.vocab_size)
    for looping in (False, True):
        for model, step_model, runner in zip((reference, fused), step_models, runners):
            model.looping = looping
            for _ in range(2):  # with graphs: the first call of a key runs eagerly, the second is captured
                model.zero_grad(set_to_none=True)
                for inputs, targets, cu in batches[:2]:
                    if runner is None:
                        forward_backward(step_model, inputs, targets, cu, 16, 2, device, True)
                    else:
                        runner(inputs, targets, cu, 16)
        # bit for bit: the matmul weights' gradients. On CUDA not the embedding's: inductor lowers its backward to
        # atomic scatter-adds there, whose order (and so the rounding of the sum) varies from run to run
        exact_kinds = (nn.Linear, nn.Embedding) if device.type == "cpu" else (nn.Linear,)
        matmul_weights = {id(m.weight) for m in reference.modules() if isinstance(m, exact_kinds)
                          and min(m.weight.shape) >= 32}
        for (name, a), b, buffer in zip(reference.named_parameters(), fused.parameters(), step_models[1].buffers):
            assert b.grad is buffer, name
            if id(a) in matmul_weights:
                assert torch.equal(a.grad, b.grad), (looping, name)
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-8, msg=f"{looping} {name}")


def test_compiled_fused_accumulation_matches_compiled_autograd_accumulation():
    """Inductor (CPU) traces the buffer adds into the backward. The gradients accumulated over two micro-batches
    match AccumulateGrad's: the matmul weights bit for bit; the small gate weights, whose gradient inductor computes
    as a reduction it then fuses with the add, to float32 rounding (inductor 2.13 reorders that sum: 1e-9 apart)."""
    compare_compiled_accumulation(torch.device("cpu"), graphs=False)


def test_the_training_loop_with_fused_accumulation_saves_the_weights_it_saves_without(tmp_path, monkeypatch):
    """pgolf.train.loop with train.fused_grad_accumulation on, through the graphs runner (its CPU stand-in) with the
    record recipe's compile passes: the warm-up and its restore, the looping switch, set_to_none and the EMA give
    the very checkpoint of a run without the option."""
    import dataclasses

    from test_train import TINY_MODEL, TINY_TRAIN, write_data

    from pgolf.config import OptimConfig
    from pgolf.train import loop
    from pgolf.train.checkpoint import load_checkpoint
    from pgolf.train.distributed import DistInfo

    def stand_in(train_cfg, step_model, model, device, accum):
        params = [p for p in model.parameters() if p.requires_grad]
        return MicroBatchGraphs(step_model, model, device, accum, train_cfg.compile,
                                make_graph=lambda pool: RerunGraph(params))

    monkeypatch.setattr(loop, "micro_batch_graphs", stand_in)
    data = write_data(tmp_path / "data")
    cpu = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    weights = []
    for fused in (False, True):
        cfg = dataclasses.replace(TINY_TRAIN, iterations=6, warmup_steps=2, warmup_cu_passes=1,
                                  fused_grad_accumulation=fused)
        summary = loop.train_in_group(TINY_MODEL, OptimConfig(), cfg, 7, data, tmp_path / f"out{fused}", cpu)
        assert summary["cuda_graphs"]["cuda_graph_replays"] > 0 and summary["loop_enabled_step"] == 3
        weights.append(load_checkpoint(tmp_path / f"out{fused}" / "checkpoint")[0])
    assert weights[0].keys() == weights[1].keys()
    for name in weights[0]:
        assert torch.equal(weights[0][name], weights[1][name]), name


@pytest.mark.gpu
def test_fused_accumulation_through_cuda_graphs_matches_autograd_on_the_gpu():
    """Real CUDA graphs around the compiled model under bf16 autocast: the gradients of compare_compiled_accumulation."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    compare_compiled_accumulation(torch.device("cuda"), graphs=True)
