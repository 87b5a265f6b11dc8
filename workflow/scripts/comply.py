"""Rule comply: the rules of rules.md on the run's own records. Record mode: a FAIL fails the job, so no submission
is packaged (aggregate needs comply.json); sweeps write the verdicts and gate nothing."""
import json

from pgolf.config import parse_run_config
from pgolf.io import run_logged


def work():
    from pgolf.compliance.comply import run_comply

    cfg = parse_run_config(json.loads(snakemake.params.config), "comply recipe")
    return run_comply(snakemake.params.run_dir, cfg, snakemake.params.data_dir, snakemake.output[0])


if __name__ == "__main__":  # not in the worker processes that multiprocessing spawns from this file
    run_logged(snakemake.log[0], work, "comply")
