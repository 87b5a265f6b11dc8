# pgolf: the whole pipeline as one DAG. Thin on purpose: configuration, validation, the stage rule files, `all`.
#
#   snakemake --cores all                                   # the record recipe (config.yaml)
#   snakemake --cores all --configfile recipes/smoke.yaml   # the CPU smoke recipe on the bundled corpus
#
# A recipe file is a whole configuration; config.yaml is read only when no --configfile is given.

import yaml
from snakemake.utils import update_config, validate

if "run" not in config:
    _defaults = yaml.safe_load(open(workflow.source_path("config.yaml"), encoding="utf-8"))
    update_config(_defaults, config)
    config.clear()
    config.update(_defaults)

validate(config, "workflow/schemas/config.schema.yaml")


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/quantize.smk"
include: "workflow/rules/artifact.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/compliance.smk"
include: "workflow/rules/report.smk"


rule all:
    input:
        f"{RUN_DIR}/submission.json",
        f"{RUN_DIR}/report.html",
        f"{RUN_DIR}/records",
        COMPLY_JSON,
