"""Rule comply: the rules of rules.md on the run's own records. Record mode: a FAIL fails the job, so no submission
is packaged (aggregate needs comply.json); sweeps write the verdicts and gate nothing."""
import json
from pathlib import Path

from pgolf.config import parse_run_config
from pgolf.io import progress, read_json, run_logged


def work():
    from pgolf.compliance.comply import run_comply

    cfg = parse_run_config(json.loads(snakemake.params.config), "comply recipe")
    status = run_comply(snakemake.params.run_dir, cfg, snakemake.params.data_dir, snakemake.output[0])
    if not Path(snakemake.output[0]).exists():  # record mode: a FAIL writes no verdicts, so nothing is packaged
        progress("NOT COMPLIANT: a record run with a failing rule is not packaged (the rules are in the log)",
                 final=True)
        return status
    report = read_json(snakemake.output[0])
    counts = report.get("counts", {})
    failed = report.get("failed_rules") or []
    progress(f"{'COMPLIANT' if report.get('compliant') else 'NOT COMPLIANT'}: {counts.get('PASS', 0)} pass, "
             f"{counts.get('FAIL', 0)} fail{' (' + ', '.join(failed) + ')' if failed else ''}, "
             f"{counts.get('NOT-APPLICABLE', 0)} not applicable", final=True)
    return status


if __name__ == "__main__":  # not in the worker processes that multiprocessing spawns from this file
    run_logged(snakemake.log[0], work, "comply")
