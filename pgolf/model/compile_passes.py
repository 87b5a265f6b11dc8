"""Inductor graph passes for the training step (``train.compile_add_into_matmul``).

Why: inductor's post-grad ``addmm`` pattern turns ``x + a @ b`` into ``addmm(x, a, b)`` whenever the sum has a user
that is not pointwise (in the training step: the sum is saved for the backward). For a 2-D ``x`` cuBLAS's addmm
first copies ``x`` into its output, then runs a GEMM that reads it back (beta = 1). In the record recipe's step that
copy was 4.3 ms a step on one H100 (64 copies of a [98,304, 512] bf16 residual, looping off; docs/benchmarks.md).
Kept apart, the matmul writes its product and the add fuses into the pointwise kernel that reads the product
anyway. The product is then rounded to bf16 before the add, as eager PyTorch rounds it; addmm rounds once, after.
"""

from __future__ import annotations

from torch._inductor.custom_graph_pass import CustomGraphPass


class SplitResidualAddmm(CustomGraphPass):
    """Post-grad pass: every ``addmm(x, a, b)`` (alpha = beta = 1) whose ``x`` has the product's own 2-D shape
    becomes ``mm(a, b) + x``. Bias addmms (a 1-D or broadcast ``x``: cuBLAS adds those in its epilogue, no copy)
    are left alone."""

    def __call__(self, graph) -> None:
        import torch

        aten = torch.ops.aten
        for node in list(graph.nodes):
            if node.op != "call_function" or node.target is not aten.addmm.default or node.kwargs or len(node.args) != 3:
                continue
            x, a, b = node.args
            total = node.meta.get("val")
            x_val = x.meta.get("val") if isinstance(x, torch.fx.Node) else None
            if total is None or x_val is None or x_val.dim() != 2 or x_val.shape != total.shape:
                continue
            with graph.inserting_before(node):
                product = graph.call_function(aten.mm.default, (a, b))
                split = graph.call_function(aten.add.Tensor, (product, x))
            product.meta["val"] = aten.mm.default(a.meta["val"], b.meta["val"])  # fake tensors: shapes only
            split.meta["val"] = total
            node.replace_all_uses_with(split)
            graph.erase_node(node)

    def uuid(self) -> str:
        """Inductor's FX-graph cache key for this pass: bump the version whenever the rewrite changes (a hash of
        this file would not survive the shipped single-file bundle)."""
        return "pgolf.SplitResidualAddmm.v1"

    def __repr__(self) -> str:  # how compile options are recorded in results (JSON)
        return "pgolf.SplitResidualAddmm"
