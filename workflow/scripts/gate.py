"""Rule gate: compressed model bytes + counted code bytes <= the cap (the report is written either way)."""
from pgolf.config import PackConfig, section_from_json
from pgolf.io import progress, run_logged


def work():
    from pgolf.artifact.gate import run_gate

    cfg = section_from_json(PackConfig, snakemake.params.pack, "pack")
    report, status = run_gate(snakemake.input.pack_report, snakemake.input.code, snakemake.input.artifact, cfg,
                              snakemake.output.report,
                              code_id=snakemake.params.code_id)
    if status:
        print(f"gate: refused: {report['message']}")
    progress(report["message"], final=True)
    return status


if __name__ == "__main__":  # not in the worker processes that multiprocessing spawns from this file
    run_logged(snakemake.log[0], work, f"gate seed {snakemake.wildcards.seed}")
