"""CUDA graphs for the short, launch-bound TTT steps of the record variant (``evaluate.ttt.cuda_graphs``).

A step of width w <= ``cuda_graph_max_width`` of a full batch (``docs_per_batch`` documents on a lane's adapters)
runs with ALL the batch's rows (finished documents get empty rows, as in the record: their A only decays), so its
shapes depend on w alone. On CUDA the whole step (rows built on the device from a static copy of the batch's
(start, length, chunks), the forward, scoring, ledger, backward and the fused AdamW) is run eagerly the first time
a width occurs, captured the second time and replayed from then on: one graph per width, one shared memory pool,
nothing read back to the host. Host-side counters that the replay cannot update (steps, score calls, updates) are
advanced here.

Without CUDA (and when a capture fails, or per-position NLL is kept for tests) the very same padded step runs
eagerly: the CPU tests exercise this path and check it against the exact-row path.
"""

from __future__ import annotations

import sys

import torch


class StepGraphs:
    def __init__(self, runner):
        self.runner = runner
        cfg = runner.cfg
        self.max_width = min(cfg.cuda_graph_max_width, runner.ctx - 1)  # w < ctx: the width fixes the step index
        self.capture = (runner.device.type == "cuda" and runner.scores._nll is None
                        and not cfg.debug_update_before_score)
        self.meta = torch.zeros((3, runner.P), dtype=torch.int64, device=runner.device)  # static inputs
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.seen: set[int] = set()
        self.pool = None
        self.replays = 0
        self.padded_steps = 0
        self.failure = None

    def eligible(self, batch, lane, n: int, w: int) -> bool:
        return lane is not None and n == self.runner.P and w <= self.max_width

    def run(self, runner, meta_all, c: int, w: int, trains: bool) -> None:
        self.padded_steps += 1
        self.meta.copy_(meta_all)
        meta = (self.meta[0], self.meta[1], self.meta[2])
        P = runner.P
        if not self.capture or self.failure is not None or c not in self.seen:
            self.seen.add(c)  # the first occurrence runs eagerly (and warms up everything a capture needs)
            runner.step(meta, c, w, trains, 0, P)
            return
        graph = self.graphs.get(c)
        if graph is None:
            graph = self._capture(runner, meta, c, w, trains)
            if graph is None:
                runner.step(meta, c, w, trains, 0, P)
                return
        graph.replay()
        self.replays += 1
        runner.scores.calls += 1
        runner.ledger.score_calls += 1
        if trains:
            runner.ledger.updates += 1
            runner.summary["steps"] += 1

    def _capture(self, runner, meta, c: int, w: int, trains: bool):
        views = runner.workspace.views(0, runner.P)
        graph = torch.cuda.CUDAGraph()
        calls, score_calls, updates, steps = (runner.scores.calls, runner.ledger.score_calls, runner.ledger.updates,
                                              runner.summary["steps"])
        try:
            torch.cuda.synchronize(runner.device)
            with torch.cuda.graph(graph, pool=self.pool):
                runner.step(meta, c, w, trains, 0, runner.P, views=views, cache=False)
        except Exception as exc:  # a capture that fails leaves the evaluation eager, never wrong
            self.failure = f"width {w}: {type(exc).__name__}: {str(exc).strip().splitlines()[-1][:300]}"
            print(f"warning: CUDA graph capture failed ({self.failure}); short steps run eagerly", file=sys.stderr)
            torch.cuda.synchronize(runner.device)
            return None
        finally:  # the capture ran no kernel: undo its host-side counts
            runner.scores.calls, runner.ledger.score_calls, runner.ledger.updates = calls, score_calls, updates
            runner.summary["steps"] = steps
        self.pool = graph.pool()
        self.graphs[c] = graph
        return graph

    def summary(self) -> dict:
        return {"cuda_graphs_captured": len(self.graphs), "cuda_graph_replays": self.replays,
                "padded_steps": self.padded_steps, "cuda_graph_failure": self.failure}
