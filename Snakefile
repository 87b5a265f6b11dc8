# pgolf: the whole pipeline as one DAG. Thin on purpose: signals, the recipe, the stage rule files, `all`, and
# the closing summary.
#
#   snakemake --cores all                                   # the record recipe (config.yaml)
#   snakemake --cores all --configfile recipes/smoke.yaml   # the CPU smoke recipe on the bundled corpus
#   snakemake --cores all --config recipe=recipes/smoke.yaml   # the same; YAML syntax errors get their line too
#
# A recipe file is a whole configuration; config.yaml is read only when no recipe is given. A mistake in it is
# one line naming the file, the line and the key (`pgolf config check FILE` says the same).
#
# profiles/default/config.yaml is loaded by Snakemake by itself: an interrupted run (Ctrl-C, a closed terminal,
# a killed job) is resumed by the same command.

import os
import signal
import sys


def _stop_gracefully(signum, frame):
    """Ctrl-C and a closed terminal (SIGHUP) do what SIGTERM does: the lock is released and the outputs of jobs
    that did not finish are removed, so the same command resumes the run. The running jobs stop because the
    terminal signals their process group too; a signal to Snakemake's pid alone lets them finish first. Before the
    scheduler installs its SIGTERM handler (while the DAG is built), they interrupt as usual."""
    if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, signal.SIG_IGN, None):
        raise KeyboardInterrupt
    os.kill(os.getpid(), signal.SIGTERM)


for _signal in (signal.SIGINT, signal.SIGHUP):
    if signal.getsignal(_signal) is not signal.SIG_IGN:  # a signal ignored on entry stays ignored (nohup)
        try:
            signal.signal(_signal, _stop_gracefully)
        except ValueError:  # not the main thread (Snakemake's API run from a thread): leave the signals alone
            pass


from pgolf.config import ConfigError, recipe_from_snakemake

try:
    CFG = recipe_from_snakemake(config, workflow.configfiles, os.path.join(workflow.basedir, "config.yaml"))
except ConfigError as exc:
    sys.stderr.write(f"pgolf: error: {exc}\n")
    sys.exit(2)


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


onsuccess:
    from pgolf.report.summary import closing_summary

    print(closing_summary(RUN_DIR), file=sys.stderr)


onerror:
    from pgolf.report.summary import failure_hint

    print(failure_hint(RUN_DIR, DATA_DIR), file=sys.stderr)
