# Shared by every stage: the typed config (CFG, read and checked by the Snakefile) and the paths of the results tree.
import json

from pgolf.config import to_dict
from pgolf.model.device import visible_gpus

RUN = CFG.run
DATA_DIR = f"results/data/{CFG.data.name}"
RUN_DIR = f"results/{RUN}"


def section_json(section, omit=(), **overrides):
    """One config section as JSON for a rule's params (Snakemake reruns a rule when its params change), less the
    keys in ``omit`` (keys the rule's stage never reads: changing them must not rerun it)."""
    data = {key: value for key, value in to_dict(getattr(CFG, section)).items() if key not in omit}
    data.update(overrides)
    return json.dumps(data, sort_keys=True)


VISIBLE_GPUS = visible_gpus()  # 0 on CPU: the GPU rules then run one process
# One GPU job at a time on one machine, whatever the command line: the GPU stages (train, Hessians, evaluate) take
# the visible GPUs by themselves, so two at once would share them and slow a timed run. `--resources gpu_jobs=N`
# allows more (the slurm profile does: each job gets a node of its own).
workflow.global_resources.setdefault("gpu_jobs", 1)


def code_file():
    """The counted code file of this run (train_gpt.py, written by the bundle rule); the pack stage counts it."""
    return f"{RUN_DIR}/code/train_gpt.py"


def code_report_file():
    """The bundle's description of train_gpt.py (train_gpt.py.json: hashes, sizes, third-party modules, the error
    tags' texts), written beside it by the bundle rule; the reports read it."""
    from pgolf.artifact.bundle import report_path

    return str(report_path(code_file()))


def checkpoint_dir(wildcards):
    """A seed's training checkpoint folder (Hessians, quantize, pack and evaluation read its model config)."""
    return f"{RUN_DIR}/seed{wildcards.seed}/train/checkpoint"
