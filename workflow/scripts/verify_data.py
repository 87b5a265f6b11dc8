"""Rule verify_data: the gate in front of training (BOS per document, sidecar, disjoint splits, doc counts)."""
from pathlib import Path

from pgolf.io import atomic_write_json, progress, run_logged


def work():
    from pgolf.data import verify

    p = snakemake.params
    report = verify.verify_dir(Path(snakemake.input[0]), expected_val_docs=p.val_docs, record=p.record,
                               val_duplicates_policy=p.val_duplicates_policy,
                               max_val_overlap_fraction=p.max_val_overlap_fraction)
    verify.print_report(report)
    failed = [c.name for c in report.checks if not c.ok]
    progress("OK" if report.ok else f"FAILED: {', '.join(failed)} (see the log)", final=True)
    if not report.ok:
        return 1
    atomic_write_json(snakemake.output[0], report.to_dict())


if __name__ == "__main__":  # not in the worker processes that multiprocessing spawns from this file
    run_logged(snakemake.log[0], work, "verify_data")
