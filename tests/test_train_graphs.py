"""train.cuda_graphs (pgolf.train.graphs): micro-batches through captured graphs train exactly as eager ones.

On CPU the graph is a stand-in that keeps a real capture's contract: capturing runs nothing, a replay re-runs the
captured function on the static inputs, and every gradient it accumulates into must be the very tensor bound as
``p.grad`` at capture, and the weights it reads must still live where they lived (a CUDA graph reads and writes
fixed addresses). The training loop is checked with the stand-in too; the GPU test captures real CUDA graphs.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from eval_fixtures import TINY
from pgolf.model.gpt import GPT
from pgolf.train.graphs import MicroBatchGraphs
from pgolf.train.step import forward_backward, optimizer_step

ACCUM = 3


class RerunGraph:
    """A CUDA graph's contract on CPU (module docstring), the weights read in place included."""

    def __init__(self, params: list[nn.Parameter]):
        self.params, self.fn, self.loss, self.bound = params, None, None, None

    def capture(self, fn):
        self.fn, self.loss = fn, torch.full((), float("nan"))
        self.bound = [p.grad for p in self.params]  # where the captured AccumulateGrad nodes write
        self.addresses = [p.data_ptr() for p in self.params]  # where the captured kernels read the weights
        return self.loss

    def replay(self) -> None:
        assert [p.data_ptr() for p in self.params] == self.addresses, "a replay would read weights no longer there"
        for p, grad in zip(self.params, self.bound):
            assert grad is None or p.grad is grad, "a replay would add into a gradient that is no longer p.grad"
        self.loss.copy_(self.fn())
        for p, grad in zip(self.params, self.bound):
            assert grad is None or p.grad is grad, "the accumulation replaced the captured gradient tensor"

    def pool(self):
        return ("cpu", 0)


class FailingGraph(RerunGraph):
    def capture(self, fn):
        raise RuntimeError("operation not permitted when stream is capturing")


class PartlyUsed(nn.Module):
    """A loss that never reads ``unused``: its grad stays None, so AdamW must skip it (no weight decay)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 8)
        self.out = nn.Linear(8, 50)
        self.unused = nn.Parameter(torch.ones(4))
        self.looping = False

    def forward(self, inputs, targets, cu_seqlens, max_seqlen):
        h = self.emb(inputs) * (2.0 if self.looping else 1.0) + cu_seqlens.float().mean() * 1e-3
        return nn.functional.cross_entropy(self.out(h), targets)


def micro_batches(seed: int, vocab: int):
    """Six micro-batches of 24 tokens with two cu_seqlens lengths (two graph keys per loop state)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(6):
        tokens = torch.randint(2, vocab, (25,), generator=g)
        cu = torch.tensor([0, 10, 24], dtype=torch.int32) if i % 2 else torch.tensor([0, 5, 12, 24, 24], dtype=torch.int32)
        out.append((tokens[:-1].clone(), tokens[1:].clone(), cu))
    return out


def train(model: nn.Module, graphs: bool, make_graph=None, steps: int = 5, loop_from: int = 3,
          device: torch.device = torch.device("cpu"), step_model=None):
    """``steps`` AdamW steps of ACCUM micro-batches, looping on from step ``loop_from``; returns (losses, runner).
    On CPU the graphs are ``make_graph``'s (default: the stand-in), on CUDA real ones. ``step_model``: what a
    micro-batch calls (default: the model itself)."""
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    if device.type == "cpu" and make_graph is None:
        make_graph = lambda pool: RerunGraph(params)  # noqa: E731
    step_model = model if step_model is None else step_model
    runner = MicroBatchGraphs(step_model, model, device, ACCUM, compiled=False, make_graph=make_graph) if graphs else None
    batches = micro_batches(0, 50 if isinstance(model, PartlyUsed) else TINY.vocab_size)
    losses = []
    for step in range(steps):
        model.looping = step >= loop_from
        for k in range(ACCUM):
            inputs, targets, cu = batches[(step * ACCUM + k) % len(batches)]
            if runner is None:
                loss = forward_backward(step_model, inputs, targets, cu, 16, ACCUM, device, False)
            else:
                loss = runner(inputs, targets, cu, 16)
            losses.append(loss.clone())
        optimizer_step(params, [opt], 1.0, None)
    return torch.stack(losses), runner


def tiny_gpt() -> GPT:
    torch.manual_seed(0)
    model = GPT(TINY)
    with torch.no_grad():  # the record init zeroes the output projections: random weights move every gradient
        for p in model.parameters():
            p.add_(torch.randn(p.shape) * 0.1)
    return model


@pytest.mark.parametrize("build", [tiny_gpt, lambda: PartlyUsed()], ids=["gpt", "partly_used"])
def test_replayed_micro_batches_train_as_eager_ones(build):
    torch.manual_seed(1)
    eager_model = build()
    graph_model = copy.deepcopy(eager_model)
    eager_losses, _ = train(eager_model, graphs=False)
    graph_losses, runner = train(graph_model, graphs=True)
    assert torch.equal(eager_losses, graph_losses)
    for (name, a), b in zip(eager_model.named_parameters(), graph_model.parameters()):
        assert torch.equal(a, b), name
    summary = runner.summary()
    # two cu_seqlens lengths x two loop states, each captured once; per loop state the first micro-batch runs
    # eagerly and the other cu_seqlens length is captured from its sibling's eager run
    assert summary["cuda_graphs_captured"] == 4 and summary["eager_micro_batches"] == 2
    assert summary["cuda_graph_replays"] == 5 * ACCUM - 2 and summary["cuda_graph_failure"] is None
    assert summary["eager_micro_batches_beside_pool"] == 1  # looping on's first micro-batch, after looping off's captures


def test_parameters_no_graph_touches_keep_no_gradient():
    model = PartlyUsed()
    before = model.unused.detach().clone()
    _, runner = train(model, graphs=True)
    index = [id(p) for p in runner.params].index(id(model.unused))
    assert all(index not in touched for touched in runner.touched.values())
    assert model.unused.grad is None and torch.equal(model.unused, before)  # AdamW skipped it: no weight decay


def test_a_failed_capture_leaves_training_eager(capsys):
    eager_model = PartlyUsed()
    graph_model = copy.deepcopy(eager_model)
    eager_losses, _ = train(eager_model, graphs=False)
    params = list(graph_model.parameters())
    graph_losses, runner = train(graph_model, graphs=True, make_graph=lambda pool: FailingGraph(params))
    assert torch.equal(eager_losses, graph_losses)
    assert runner.summary()["cuda_graph_replays"] == 0 and runner.eager_calls == 5 * ACCUM
    assert "operation not permitted" in runner.failure
    assert "CUDA graph capture of a training micro-batch failed" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graphs_train_as_eager_on_the_gpu():
    device = torch.device("cuda")
    torch.manual_seed(1)
    eager_model = tiny_gpt().to(device)
    graph_model = copy.deepcopy(eager_model)
    eager_losses, _ = train(eager_model, graphs=False, device=device)
    graph_losses, runner = train(graph_model, graphs=True, device=device)
    assert runner.summary()["cuda_graphs_captured"] == 4 and runner.failure is None
    assert runner.summary()["graph_pool_gib"] > 0
    torch.testing.assert_close(eager_losses.cpu(), graph_losses.cpu(), rtol=0, atol=0)
    for (name, a), b in zip(eager_model.named_parameters(), graph_model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("cu_passes", [0, 1])
def test_the_training_loop_with_replays_saves_the_weights_it_saves_without(tmp_path, monkeypatch, cu_passes):
    """pgolf.train.loop with train.cuda_graphs on: the warm-up (its captures, then the restore), the looping switch,
    the optimizers' set_to_none and the EMA around replayed micro-batches give the very checkpoint of a run
    without graphs. On CPU the loop is handed the stand-in graph (the loop itself builds graphs on CUDA only).

    With compile passes (the record recipe's warm-up) every eager micro-batch runs before the first capture: none
    holds its activations beside the graphs' pool."""
    import dataclasses

    from test_train import TINY_MODEL, TINY_TRAIN, write_data

    from pgolf.config import OptimConfig
    from pgolf.train import loop
    from pgolf.train.checkpoint import load_checkpoint
    from pgolf.train.distributed import DistInfo

    runners = []

    def stand_in(train_cfg, step_model, model, device, accum):
        if not train_cfg.cuda_graphs:
            return None
        params = [p for p in model.parameters() if p.requires_grad]
        runners.append(MicroBatchGraphs(step_model, model, device, accum, train_cfg.compile,
                                        make_graph=lambda pool: RerunGraph(params)))
        return runners[-1]

    monkeypatch.setattr(loop, "micro_batch_graphs", stand_in)
    data = write_data(tmp_path / "data")
    cpu = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    weights, summaries = [], []
    for graphs in (False, True):
        cfg = dataclasses.replace(TINY_TRAIN, iterations=6, warmup_steps=2, cuda_graphs=graphs,
                                  warmup_cu_passes=cu_passes)
        summaries.append(loop.train_in_group(TINY_MODEL, OptimConfig(), cfg, 7, data, tmp_path / f"out{graphs}", cpu))
        weights.append(load_checkpoint(tmp_path / f"out{graphs}" / "checkpoint")[0])
    assert summaries[0]["cuda_graphs"] is None and summaries[0]["loop_enabled_step"] == 3
    replayed = summaries[1]["cuda_graphs"]
    assert replayed["cuda_graphs_captured"] >= 2 and replayed["cuda_graph_replays"] > 0  # both loop states
    assert replayed["cuda_graph_failure"] is None and len(runners) == 1
    assert {key[3] for key in runners[0].captured} == {False, True}
    if cu_passes:  # 4 cu_seqlens lengths x 2 loop states, all before any capture; the steps only replay
        assert replayed["eager_micro_batches"] == 8 and replayed["eager_micro_batches_beside_pool"] == 0
    else:  # each loop state's first micro-batch; looping on's after looping off's captures
        assert replayed["eager_micro_batches"] == 2 and replayed["eager_micro_batches_beside_pool"] == 1
    assert weights[0].keys() == weights[1].keys()
    for name in weights[0]:
        assert torch.equal(weights[0][name], weights[1][name]), name
