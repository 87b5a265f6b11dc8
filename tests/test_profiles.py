"""The Snakemake profiles: settings the executors accept. The SLURM plugin (snakemake-executor-plugin-slurm, not
installed here) sets the GPU request, the node count, the partition, the time and memory itself and refuses a job
whose `slurm_extra` repeats one of them; it asks for GPUs through the `gres` (or `gpu`) resource, while pgolf's
rules read `gpus` for torchrun's process count. Both must say the same number."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
# options the SLURM plugin manages (its validate_slurm_extra): never in slurm_extra
PLUGIN_MANAGED = ("--gres", "--gpus", "--nodes", "-N", "--ntasks", "-n", "--partition", "-p", "--time", "-t",
                  "--mem", "--mem-per-cpu", "--cpus-per-task", "-c", "--cpus-per-gpu", "--account", "-A",
                  "--job-name", "-J", "--output", "-o", "--error", "-e", "--constraint", "-C", "--qos")


def test_the_slurm_profile_asks_the_plugin_for_the_gpus_the_rules_start():
    profile = yaml.safe_load((REPO / "profiles" / "slurm" / "config.yaml").read_text())
    assert profile["executor"] == "slurm"
    gpu_rules = {rule: res for rule, res in profile["set-resources"].items() if res.get("gpus")}
    assert set(gpu_rules) == {"train", "evaluate", "hessians"}
    for rule, res in gpu_rules.items():
        assert res["gres"] == f"gpu:{res['gpus']}", rule  # the plugin's request = torchrun's process count
        assert res["nodes"] == 1, rule  # one torchrun --standalone per job
        words = str(res.get("slurm_extra", "")).strip("'\"").split()
        managed = [w for w in words if re.split("=", w)[0] in PLUGIN_MANAGED]
        assert not managed, f"{rule}: slurm_extra repeats what the plugin sets: {managed}"
    assert profile["set-resources"]["train"]["gpus"] == profile["set-resources"]["evaluate"]["gpus"] == 8
