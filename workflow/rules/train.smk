# The training stage, one job per seed: torchrun with one process per GPU (one process on CPU).
#
#   results/<run>/seed<seed>/train/checkpoint/{model.pt,checkpoint.json}, metrics.jsonl, train_summary.json


def train_dir(seed):
    return f"{RUN_DIR}/seed{seed}/train"


rule train:
    input:
        verified=DATA_VERIFIED,
        shards=SHARDS_DIR,
        preflight=ancient(f"{RUN_DIR}/preflight.json"),
    output:
        checkpoint=f"{RUN_DIR}/seed{{seed}}/train/checkpoint/checkpoint.json",
        weights=f"{RUN_DIR}/seed{{seed}}/train/checkpoint/model.pt",
        summary=f"{RUN_DIR}/seed{{seed}}/train/train_summary.json",
        metrics=f"{RUN_DIR}/seed{{seed}}/train/metrics.jsonl",
    params:
        model=section_json("model"),
        optim=section_json("optim"),
        train=section_json("train"),
        out_dir=lambda wc: train_dir(wc.seed),
    threads: workflow.cores
    resources:
        gpus=VISIBLE_GPUS,
        gpu_jobs=1,
    log:
        f"{RUN_DIR}/seed{{seed}}/logs/train.log",
    shell:
        "torchrun --standalone --nproc_per_node $(( {resources.gpus} > 0 ? {resources.gpus} : 1 )) -m pgolf.train"
        " --model-json '{params.model}' --optim-json '{params.optim}' --train-json '{params.train}'"
        " --seed {wildcards.seed} --data-dir {input.shards} --out-dir {params.out_dir} > {log} 2>&1"
