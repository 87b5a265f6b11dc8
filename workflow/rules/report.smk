# Multi-seed aggregation: statistics, submission.json, the submission folder and the HTML report.
#
#   results/<run>/{submission.json, report.html, aggregate.json, seeds.csv}
#   results/<run>/records/track_10min_16mb/YYYY-MM-DD_<Name>/
#
# `aggregate` needs every seed. After a failed seed (`--keep-going` lets the others finish), the target
# `partial` reports on the seeds that have results and lists the missing ones, under results/<run>/partial/.

import os

SEED_FILES = (
    "train/train_summary.json",
    "train/metrics.jsonl",
    "train/checkpoint/checkpoint.json",
    "hessians/hessian_report.json",
    "pack/pack_report.json",
    "gate/gate_report.json",
    "eval/eval.json",
)


def seed_files(seeds):
    return [f"{RUN_DIR}/seed{seed}/{name}" for seed in seeds for name in SEED_FILES]


def seeds_with_results():
    """The seeds whose every stage file exists: a seed that was evaluated but failed its size gate is missing, not
    a job `partial` would run again (and fail again)."""
    return [seed for seed in CFG.seeds if all(os.path.exists(path) for path in seed_files([seed]))]


AGGREGATE_OUTPUTS = ("submission.json", "report.html", "aggregate.json", "seeds.csv")


rule aggregate:
    input:
        seed_files(CFG.seeds),
        code=code_file(),
        code_report=code_report_file(),
        # the report shows the compliance verdict; in record mode only a compliant run gets here (comply.smk)
        comply=COMPLY_JSON,
    output:
        *[f"{RUN_DIR}/{name}" for name in AGGREGATE_OUTPUTS],
        folder=directory(f"{RUN_DIR}/records"),
    params:
        aggregate=section_json("aggregate"),
        seeds=list(CFG.seeds),
        mode=CFG.mode,
        run_dir=RUN_DIR,
        out_dir=RUN_DIR,
        make_folder=True,
    log:
        f"{RUN_DIR}/logs/aggregate.log",
    script:
        "../scripts/aggregate.py"


rule partial:
    """Report on the seeds that finished; the missing ones are listed (never a record)."""
    input:
        seed_files(seeds_with_results()),
        code=code_file(),
        code_report=code_report_file(),
    output:
        *[f"{RUN_DIR}/partial/{name}" for name in AGGREGATE_OUTPUTS],
    params:
        aggregate=section_json("aggregate"),
        seeds=list(CFG.seeds),
        mode=CFG.mode,
        run_dir=RUN_DIR,
        out_dir=f"{RUN_DIR}/partial",
        make_folder=False,
    log:
        f"{RUN_DIR}/logs/partial.log",
    script:
        "../scripts/aggregate.py"
