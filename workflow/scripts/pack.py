"""Rule pack: the quantized model -> the artifact (refused, and not written, when the model alone is over the cap)."""
from pgolf.config import PackConfig, section_from_json
from pgolf.io import progress, run_logged


def work():
    from pgolf.artifact.pack import run_pack_stage

    cfg = section_from_json(PackConfig, snakemake.params.pack, "pack")
    report, status = run_pack_stage(snakemake.input.quantized, snakemake.params.checkpoint, cfg, None,
                                    snakemake.output.artifact, snakemake.output.report)
    if status:
        print(f"pack: refused: {report['message']}")
    progress(f"{report['model_bytes']:,} model bytes ({report['compressor']}) in {report['pack_seconds']:.1f} s"
             + (f"; refused: {report['message']}" if status else ""), final=True)
    return status


if __name__ == "__main__":  # not in the worker processes that multiprocessing spawns from this file
    run_logged(snakemake.log[0], work, f"pack seed {snakemake.wildcards.seed}")
