# The compliance check of a whole run: the rules of rules.md on the run's own records (pgolf/compliance/comply.py).
#
#   results/<run>/comply.json   one verdict per rule (PASS / FAIL / NOT-APPLICABLE) with its evidence
#
# Record mode: a FAIL stops the job (exit 1), and `aggregate` takes comply.json as input, so no submission
# folder is written for a non-compliant run (the verdicts stay in logs/comply.log). Sweep mode: the check runs
# and writes comply.json (a failing `mode` rule does not stop the DAG) but gates nothing. In both modes the
# report shows the verdicts, grouped.

from pgolf.compliance.comply import undeclared_seeds

COMPLY_JSON = f"{RUN_DIR}/comply.json"
COMPLY_SEED_FILES = (
    "train/train_summary.json",
    "train/checkpoint/checkpoint.json",
    "hessians/hessian_report.json",
    "gate/gate_report.json",
    "eval/eval.json",
)


def comply_recipe():
    """The recipe for the check, less what it never reads and the report alone uses (the ``aggregate`` section)
    or what changes no byte (``data.workers``): editing those must not re-judge the run."""
    from pgolf.config import AggregateConfig

    recipe = to_dict(CFG)
    recipe["data"]["workers"] = 0
    recipe["aggregate"] = to_dict(AggregateConfig())
    return json.dumps(recipe, sort_keys=True)


rule comply:
    input:
        [f"{RUN_DIR}/seed{seed}/{name}" for seed in CFG.seeds for name in COMPLY_SEED_FILES],
        verified=DATA_VERIFIED,
    output:
        COMPLY_JSON,
    params:
        config=comply_recipe(),
        data_dir=DATA_DIR,
        run_dir=RUN_DIR,
        # the seeds rule also reads which seed<N>/ folders exist: one the recipe does not declare re-judges the run
        undeclared_seeds=lambda wildcards: undeclared_seeds(RUN_DIR, CFG.seeds),
    log:
        f"{RUN_DIR}/logs/comply.log",
    script:
        "../scripts/comply.py"
