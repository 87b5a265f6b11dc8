# The post-training stages, one job per seed (paths under results/<run>/seed<seed>/):
#
#   hessians/hessians.pt, hessians/hessian_report.json     GPTQ input statistics from TRAINING data (budget-checked)
#   quantize/quantized.pt, quantize/quantize_report.json   GPTQ + SDClip + LQER, per-tensor errors
#   pack/artifact.pgolf, pack/pack_report.json             the artifact (model bytes held against the cap)
#   gate/gate_report.json                                  model bytes + counted code bytes of train_gpt.py vs the cap
#
# Each rule's params carry exactly its own config section, so a changed knob reruns its stage and the ones after
# it: a clip sigma reruns quantize and pack, the compressor reruns pack only. Every rule reads the model config from
# the checkpoint, never from the recipe.


def checkpoint_dir(wildcards):
    return f"{RUN_DIR}/seed{wildcards.seed}/train/checkpoint"


rule hessians:
    """Calibration reads count toward the training budget: in record mode the stage fails if train + Hessians > cap."""
    input:
        checkpoint=f"{RUN_DIR}/seed{{seed}}/train/checkpoint/checkpoint.json",
        weights=f"{RUN_DIR}/seed{{seed}}/train/checkpoint/model.pt",
        verified=DATA_VERIFIED,
        shards=SHARDS_DIR,
    output:
        hessians=f"{RUN_DIR}/seed{{seed}}/hessians/hessians.pt",
        report=f"{RUN_DIR}/seed{{seed}}/hessians/hessian_report.json",
    params:
        hessians=section_json("hessians"),
        mode=CFG.mode,
        checkpoint=checkpoint_dir,
    resources:
        gpus=min(VISIBLE_GPUS, 1),
        gpu_jobs=1,
    log:
        f"{RUN_DIR}/seed{{seed}}/logs/hessians.log",
    shell:
        "python -m pgolf.hessian --checkpoint {params.checkpoint} --data-dir {input.shards}"
        " --hessian-json {params.hessians:q} --seed {wildcards.seed} --mode {params.mode}"
        " --out {output.hessians} --report {output.report} > {log} 2>&1"


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
    threads: min(workflow.cores, 8)
    log:
        f"{RUN_DIR}/seed{{seed}}/logs/quantize.log",
    shell:
        "python -m pgolf.quantize --checkpoint {params.checkpoint} --hessians {input.hessians}"
        " --quantize-json {params.quantize:q} --threads {threads}"
        " --out {output.quantized} --report {output.report} > {log} 2>&1"


rule pack:
    """Exits non-zero (and writes no artifact) when the compressed model alone exceeds pack.size_cap_bytes."""
    input:
        quantized=f"{RUN_DIR}/seed{{seed}}/quantize/quantized.pt",
        checkpoint=f"{RUN_DIR}/seed{{seed}}/train/checkpoint/checkpoint.json",
    output:
        artifact=f"{RUN_DIR}/seed{{seed}}/pack/artifact.pgolf",
        report=f"{RUN_DIR}/seed{{seed}}/pack/pack_report.json",
    params:
        pack=section_json("pack"),
        checkpoint=checkpoint_dir,
    log:
        f"{RUN_DIR}/seed{{seed}}/logs/pack.log",
    shell:
        "python -m pgolf.pack_stage --quantized {input.quantized} --checkpoint {params.checkpoint}"
        " --pack-json {params.pack:q}"
        " --out {output.artifact} --report {output.report} > {log} 2>&1"


rule gate:
    """Counted code + compressed model <= the cap (pgolf/gate.py says why this is not part of pack)."""
    input:
        artifact=f"{RUN_DIR}/seed{{seed}}/pack/artifact.pgolf",
        pack_report=f"{RUN_DIR}/seed{{seed}}/pack/pack_report.json",
        code=code_file(),
    output:
        report=f"{RUN_DIR}/seed{{seed}}/gate/gate_report.json",
    params:
        pack=section_json("pack"),
    log:
        f"{RUN_DIR}/seed{{seed}}/logs/gate.log",
    shell:
        "python -m pgolf.gate --pack-report {input.pack_report} --artifact {input.artifact} --code {input.code}"
        " --pack-json {params.pack:q} --out {output.report} > {log} 2>&1"
