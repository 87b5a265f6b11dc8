"""The 16,000,000-byte check: counted code bytes + compressed model bytes against the cap.

Its own module, free of torch, because the staged pipeline's gate job needs nothing else: importing torch was
most of that job's time (:mod:`pgolf.artifact.gate`). The pack stage (the bundled record run's gate) calls the
same function.
"""

from __future__ import annotations

import dataclasses
from typing import Any

EXIT_OVER_CAP = 3  # a refusal by a gate (as the budget checks of the Hessian and evaluation stages)

# PackConfig keys that only the size gate reads (with the counted code, which the staged pack stage never sees):
# the staged pack stage neither receives them (workflow/rules/artifact.smk leaves them out of its params) nor
# records them (``pack_config``; ``code_bytes_convention`` only when this stage counted the code), so changing one
# re-runs the gate, not the model compression (minutes per seed).
GATE_ONLY_PACK_KEYS = ("code_bytes_convention",)


@dataclasses.dataclass(frozen=True)
class GateResult:
    """Outcome of the check."""

    model_bytes: int
    code_bytes: int
    total_bytes: int
    cap_bytes: int
    ok: bool
    headroom_bytes: int  # cap - total when ok, else 0
    overage_bytes: int  # total - cap when over, else 0
    message: str

    def report_fields(self) -> dict[str, Any]:
        """The verdict as the pack and gate reports write it (one spelling of the keys for both)."""
        return {"total_bytes": self.total_bytes, "cap": self.cap_bytes, "ok": self.ok,
                "headroom_bytes": self.headroom_bytes, "overage_bytes": self.overage_bytes, "message": self.message}


def size_gate(model_bytes: int, code_bytes: int, cap: int = 16_000_000) -> GateResult:
    """Compare ``model_bytes + code_bytes`` with ``cap`` (decimal bytes; equal to the cap passes)."""
    if model_bytes < 0 or code_bytes < 0 or cap <= 0:
        raise ValueError(f"size_gate: expected non-negative sizes and a positive cap, got {model_bytes}, {code_bytes}, {cap}")
    total = model_bytes + code_bytes
    what = f"artifact {total:,} bytes (model {model_bytes:,} + code {code_bytes:,})"
    if total <= cap:
        headroom = cap - total
        return GateResult(model_bytes, code_bytes, total, cap, True, headroom, 0,
                          f"{what} fits the {cap:,}-byte cap: headroom {headroom:,} bytes")
    over = total - cap
    return GateResult(model_bytes, code_bytes, total, cap, False, 0, over,
                      f"{what} is over the {cap:,}-byte cap by {over:,} bytes")
