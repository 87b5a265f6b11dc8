"""Rules aggregate and partial: multi-seed statistics, submission.json, report.html and the submission folder."""
from pgolf.config import AggregateConfig, section_from_json
from pgolf.io import progress, run_logged


def work():
    from pgolf.report.aggregate import run_report
    from pgolf.report.summary import summary_text

    p = snakemake.params
    cfg = section_from_json(AggregateConfig, p.aggregate, "aggregate")
    comply = snakemake.input.get("comply")  # the `partial` rule has none
    agg = run_report(p.run_dir, cfg, list(p.seeds), mode=p.mode, out_dir=p.out_dir, make_folder=p.make_folder,
                     comply_path=comply)
    print(summary_text(agg), end="")
    bpb = agg["val_bpb"]
    progress(f"val_bpb {bpb['mean']:.5f} over {bpb['n']} seed(s); verdict {agg['verdict']['status']}", final=True)


if __name__ == "__main__":  # not in the worker processes that multiprocessing spawns from this file
    run_logged(snakemake.log[0], work, snakemake.rule)
