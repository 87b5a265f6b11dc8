"""Rule hessians: X^T X per quantized matrix from TRAINING data (record mode: refused over the training cap)."""
from pgolf.config import HessianConfig, section_from_json
from pgolf.io import progress, run_logged


def work():
    from pgolf.quantize.hessians import run_hessian_stage

    cfg = section_from_json(HessianConfig, snakemake.params.hessians, "hessians")
    report, status = run_hessian_stage(snakemake.params.checkpoint, snakemake.input.shards, cfg,
                                       int(snakemake.wildcards.seed), snakemake.output.hessians,
                                       snakemake.output.report, snakemake.params.mode, "auto")
    if status:
        print(f"hessians: refused (record mode): {report['message']}")
    progress(f"{len(report['matrices'])} matrices from {report['calibration_tokens']:,} training tokens in "
             f"{report['hessian_seconds']:.1f} s" + (" (refused: over the budget)" if status else ""), final=True)
    return status


if __name__ == "__main__":  # not in the worker processes that multiprocessing spawns from this file
    run_logged(snakemake.log[0], work, f"hessians seed {snakemake.wildcards.seed}")
