"""Rule quantize: GPTQ + SDClip + LQER on the CPU (the quantized model does not depend on the GPU)."""
from pgolf.config import QuantizeConfig, section_from_json
from pgolf.io import progress, run_logged


def work():
    import torch

    from pgolf.quantize.stage import run_quantize_stage

    torch.set_num_threads(snakemake.threads)
    cfg = section_from_json(QuantizeConfig, snakemake.params.quantize, "quantize")
    report = run_quantize_stage(snakemake.params.checkpoint, snakemake.input.hessians, cfg,
                                snakemake.output.quantized, snakemake.output.report, "cpu")
    totals = report["totals"]
    progress(f"{totals['tensors']} tensors, LQER on {len(totals['lqer_applied'])}, "
             f"{report['payload_bytes']:,} payload bytes in {report['quantize_seconds']:.1f} s", final=True)


if __name__ == "__main__":  # not in the worker processes that multiprocessing spawns from this file
    run_logged(snakemake.log[0], work, f"quantize seed {snakemake.wildcards.seed}")
