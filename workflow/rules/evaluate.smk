# Evaluation, one job per seed: the packed artifact (as a real submission) scored with the configured TTT.
#
#   results/<run>/seed<seed>/eval/eval.json (+ eval_metrics.jsonl)
#
# Every TTT and scoring knob arrives through the `evaluate` params, so changing one reruns this rule and the
# aggregation (and the cheap bundle/gate pair, because the shipped train_gpt.py embeds the recipe), never
# training, Hessians, quantization or packing.
#
# The gate report is not an input: the evaluation reads nothing of it, and as an input it re-ran every seed's
# evaluation whenever the shipped code alone changed (an edit of an embedded module, the code-bytes convention,
# the first seed) -- Snakemake re-runs a consumer of any output rewritten in the same run, and ancient() would
# also hide a changed evaluate param (snakemake#661). The size still gates the submission: pack refuses a model
# that alone exceeds the cap, and comply and the aggregation take every seed's gate report.


rule evaluate:
    input:
        artifact=f"{RUN_DIR}/seed{{seed}}/pack/artifact.pgolf",
        pack_report=f"{RUN_DIR}/seed{{seed}}/pack/pack_report.json",
        checkpoint=f"{RUN_DIR}/seed{{seed}}/train/checkpoint/checkpoint.json",
        verified=DATA_VERIFIED,
        shards=SHARDS_DIR,
    output:
        result=f"{RUN_DIR}/seed{{seed}}/eval/eval.json",
        metrics=f"{RUN_DIR}/seed{{seed}}/eval/eval_metrics.jsonl",
    params:
        evaluate=section_json("evaluate"),
        mode=CFG.mode,
        checkpoint=checkpoint_dir,
        tokenizer="" if CFG.tokenizer.caseops else f"--tokenizer {TOKENIZER_PATH}",
    threads: workflow.cores
    resources:
        gpus=VISIBLE_GPUS,
        gpu_jobs=1,
    log:
        f"{RUN_DIR}/seed{{seed}}/logs/evaluate.log",
    shell:
        # everything into the log; the [progress] lines (documents scored, tokens/s, ETA) also onto the console
        "rm -f {log}; ( torchrun --standalone --nproc_per_node $(( {resources.gpus} > 0 ? {resources.gpus} : 1 ))"
        " -m pgolf.evaluate"
        " --artifact {input.artifact} --pack-report {input.pack_report} --eval-json {params.evaluate:q}"
        " --seed {wildcards.seed} --data-dir {input.shards} --checkpoint {params.checkpoint} {params.tokenizer}"
        " --mode {params.mode} --out {output.result} --metrics {output.metrics} ) 2>&1"
        " | python -m pgolf.io {log} --label 'evaluate seed {wildcards.seed}'"
