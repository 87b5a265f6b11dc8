"""Rule bundle: the single-file train_gpt.py the submission ships (and the gate counts)."""
import json

from pgolf.config import parse_run_config
from pgolf.io import progress, run_logged


def work():
    from pgolf.artifact.bundle import write_bundle

    cfg = parse_run_config(json.loads(snakemake.params.config), "bundle recipe")
    report = write_bundle(cfg, snakemake.output.code, minify=True, verify=True)
    print(f"{snakemake.output.code}: {report['bytes_file']:,} bytes, code hash {report['code_hash'][:16]}, "
          f"counted: file {report['bytes_file']:,}, wrapper {report['bytes_wrapper']:,}")
    progress(f"train_gpt.py {report['bytes_file']:,} bytes; counted code: file {report['bytes_file']:,}, "
             f"wrapper {report['bytes_wrapper']:,}", final=True)


if __name__ == "__main__":  # not in the worker processes that multiprocessing spawns from this file
    run_logged(snakemake.log[0], work, "bundle")
