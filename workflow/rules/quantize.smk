# The quantize stage, one job per seed (paths under results/<run>/seed<seed>/):
#
#   hessians/hessians.pt, hessians/hessian_report.json     GPTQ input statistics from TRAINING data (budget-checked)
#   quantize/quantized.pt, quantize/quantize_report.json   GPTQ + SDClip + LQER, per-tensor errors
#
# Each rule's params carry exactly its own config section, so a changed knob reruns its stage and the ones after
# it (a clip sigma reruns quantize and pack). Every rule reads the model config from the checkpoint, never from
# the recipe.


rule hessians:
    """Calibration reads count toward the training budget: in record mode the stage fails if train + Hessians > cap."""
    input:
        checkpoint=f"{RUN_DIR}/seed{{seed}}/train/checkpoint/checkpoint.json",
        weights=f"{RUN_DIR}/seed{{seed}}/train/checkpoint/model.pt",
        train_summary=f"{RUN_DIR}/seed{{seed}}/train/train_summary.json",  # the loop's seconds (budget check)
        verified=DATA_VERIFIED,
        shards=SHARDS_DIR,
    output:
        hessians=f"{RUN_DIR}/seed{{seed}}/hessians/hessians.pt",
        report=f"{RUN_DIR}/seed{{seed}}/hessians/hessian_report.json",
    params:
        hessians=section_json("hessians"),
        mode=CFG.mode,
        checkpoint=checkpoint_dir,
    threads: CFG.hessians.cpu_threads or 1  # scheduling only: the stage sets torch's threads from the recipe itself
    resources:
        gpus=min(VISIBLE_GPUS, 1),
        gpu_jobs=1,
    log:
        f"{RUN_DIR}/seed{{seed}}/logs/hessians.log",
    script:
        "../scripts/hessians.py"


rule quantize:
    """On the CPU (the default of the stage), so the quantized model does not depend on the GPU it would land on."""
    input:
        checkpoint=f"{RUN_DIR}/seed{{seed}}/train/checkpoint/checkpoint.json",
        weights=f"{RUN_DIR}/seed{{seed}}/train/checkpoint/model.pt",
        hessians=f"{RUN_DIR}/seed{{seed}}/hessians/hessians.pt",
    output:
        quantized=f"{RUN_DIR}/seed{{seed}}/quantize/quantized.pt",
        report=f"{RUN_DIR}/seed{{seed}}/quantize/quantize_report.json",
    params:
        quantize=section_json("quantize"),
        checkpoint=checkpoint_dir,
    threads: CFG.quantize.cpu_threads or min(workflow.cores, 8)  # the stage sets quantize.cpu_threads itself
    log:
        f"{RUN_DIR}/seed{{seed}}/logs/quantize.log",
    script:
        "../scripts/quantize.py"
