"""Issue 16: FlashAttention 4's Hopper tile configs at the training step's attention shapes, forward and backward.

FA4 chooses its SM90 tiles from benchmarks of dense sequences (192 x 128 forward, 128 x 128 backward at 64-dim
heads, after FA3's hopper/tile_size.h). The step's attention is varlen: documents of the training stream cut into
segments of at most 2,048 tokens, a mean causal context near 700 (the bench's ``mean_attention_context``), where a
large tile spends more of its work on masked blocks at document ends. Attention is about a quarter of the step
(164.7 ms of 639.1 looping off, one H100, FA4), so a few per cent there matter. This script times FA4's forward and
backward kernels on micro-batches of a real training stream (T = 98,304 tokens; 8 query heads of 64 dims and as many
k / v heads, as ``train.repeat_kv_heads`` gives FA4; segments as the training loader cuts them) under each candidate
config that FA4's own validator accepts, and prints ms a call, the per-step sums (88 / 136 calls looping off / on),
and each candidate's largest output and gradient differences from FA4's default choice (the same attention, summed
in another order). Candidates replace fields of FA4's default config, the forward's register split recomputed by
FA4's own rule. Not run on a GPU yet (written in the fifteenth session, after its device time was spent).

    python benchmarks/fa4_config_bench.py --data /tmp/syn [--iters N] [--out OUT.json]

Needs CUDA, Hopper and flash-attn-4 (tested with the version ``pgolf.model.flash4.TESTED_VERSION`` names). Each new
config compiles once (CuTe DSL, tens of seconds).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cuda_timing import parse_bench_args, time_ms  # noqa: E402  (benchmarks/, the script's own folder)

T, HEADS, HEAD_DIM, MAX_SEQLEN, VOCAB = 98_304, 8, 64, 2_048, 8_192
CALLS_PER_STEP = {"off": 8 * 11, "on": 8 * 17}
# forward (tile_m, tile_n, mma_pv_is_rs, intra_wg_overlap); the first is FA4's default at these shapes
FWD_CANDIDATES = [(192, 128, True, True), (128, 128, True, True), (192, 96, True, True), (128, 96, True, True),
                  (128, 64, True, True), (192, 176, True, True)]
# backward (tile_m, tile_n, SdP_swapAB, AtomLayoutMSdP, AtomLayoutNdKV, AtomLayoutMdQ); the first is the default
BWD_CANDIDATES = [(128, 128, True, 1, 2, 2), (64, 128, True, 1, 2, 1), (64, 128, True, 2, 2, 1),
                  (128, 64, True, 2, 1, 2), (128, 64, False, 2, 1, 2), (64, 64, False, 1, 1, 1)]


class ConfigOverride:
    """FA4's config selection with some fields replaced (FA4 validates the result before it compiles)."""

    def __init__(self, interface, config_module):
        self.iface, self.cfg = interface, config_module
        self.select_fwd, self.select_bwd = interface.select_fwd_config, interface.select_bwd_config
        self.fwd: dict = {}
        self.bwd: dict = {}
        interface.select_fwd_config, interface.select_bwd_config = self._fwd, self._bwd

    def _fwd(self, inputs):
        config = self.select_fwd(inputs)
        if not self.fwd:
            return config
        registers = self.cfg.select_sm90_registers(inputs, tile_m=self.fwd["tile_m"], tile_n=self.fwd["tile_n"])
        config = dataclasses.replace(config, registers=registers, **self.fwd)
        self.cfg.validate_fwd_config(config, inputs)
        return config

    def _bwd(self, inputs):
        config = self.select_bwd(inputs)
        if not self.bwd:
            return config
        config = dataclasses.replace(config, **self.bwd)
        self.cfg.validate_bwd_config(config, inputs)
        return config


def stream_cu_seqlens(data_dir: str, rows: int) -> list[torch.Tensor]:
    """cu_seqlens of the first ``rows`` micro-batches of the training stream, as the training loader cuts them."""
    from pgolf.train.bench import packed_rows, shard_stream

    stream = shard_stream(data_dir, rows * T + 1, VOCAB)
    packed = packed_rows(T, VOCAB, MAX_SEQLEN, seed=0, rows=rows, stream=stream)
    print(f"{rows} micro-batches, mean causal context {packed.mean_context:.1f}", flush=True)
    return [cu.cuda() for cu in packed.cu_seqlens]


def main(argv=None) -> int:
    def add_arguments(parser):
        parser.add_argument("--data", required=True, help="a folder of training shards (benchmarks/synthetic_shards.py)")
        parser.add_argument("--rows", type=int, default=2, help="micro-batches of the stream to time over")

    args = parse_bench_args(__doc__, "fa4_config_bench", argv, iters=10, add_arguments=add_arguments)
    import flash_attn.cute.config as fa4_config
    import flash_attn.cute.interface as fa4

    override = ConfigOverride(fa4, fa4_config)
    cus = stream_cu_seqlens(args.data, args.rows)
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, dout = (torch.randn(T, HEADS, HEAD_DIM, device="cuda", generator=gen, dtype=torch.bfloat16)
                     for _ in range(4))

    def forward(cu):
        return fa4._flash_attn_fwd(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=MAX_SEQLEN,
                                   max_seqlen_k=MAX_SEQLEN, causal=True, return_lse=True)[:2]

    def backward(cu, out, lse):
        return fa4._flash_attn_bwd(q, k, v, out, dout, lse, None, True, cu_seqlens_q=cu, cu_seqlens_k=cu,
                                   max_seqlen_q=MAX_SEQLEN, max_seqlen_k=MAX_SEQLEN)[:3]

    def run_all():
        outs = [forward(cu) for cu in cus]
        return outs, [backward(cu, *o) for cu, o in zip(cus, outs)]

    def max_diff(a, b):
        return max(float((x.float() - y.float()).abs().max()) for x, y in zip(a, b))

    reference_outs, reference_grads = run_all()  # FA4's default configs
    rows = []
    for direction, candidates, names in (
            ("fwd", FWD_CANDIDATES, ("tile_m", "tile_n", "mma_pv_is_rs", "intra_wg_overlap")),
            ("bwd", BWD_CANDIDATES, ("tile_m", "tile_n", "SdP_swapAB", "AtomLayoutMSdP", "AtomLayoutNdKV",
                                     "AtomLayoutMdQ"))):
        for candidate in candidates:
            fields = dict(zip(names, candidate))
            override.fwd, override.bwd = (fields, {}) if direction == "fwd" else ({}, fields)
            row = {"direction": direction, **fields}
            try:
                outs, grads = run_all()  # compiles the candidate
                row["max_diff"] = (max_diff([o[0] for o in outs], [o[0] for o in reference_outs]) if direction == "fwd"
                                   else max(max_diff(g, r) for g, r in zip(grads, reference_grads)))
                if direction == "fwd":
                    ms = time_ms(lambda: [forward(cu) for cu in cus], args.iters) / len(cus)
                else:
                    ms = time_ms(lambda: [backward(cu, *o) for cu, o in zip(cus, reference_outs)], args.iters) / len(cus)
                row["ms_per_call"] = ms
                row["ms_per_step"] = {loop: calls * ms for loop, calls in CALLS_PER_STEP.items()}
            except Exception as exc:  # FA4 refused the config, or it failed to compile
                row["error"] = f"{type(exc).__name__}: {exc}"[:300]
            rows.append(row)
            shown = (f"{row['ms_per_call']:.3f} ms a call, {row['ms_per_step']['off']:.1f} / "
                     f"{row['ms_per_step']['on']:.1f} ms a step, max diff {row['max_diff']:.3g}"
                     if "ms_per_call" in row else row["error"])
            print(f"{direction} {candidate}: {shown}", flush=True)
    override.fwd, override.bwd = {}, {}
    if args.out:
        args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                        "rows": args.rows, "candidates": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
