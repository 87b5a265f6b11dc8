# The training stage, one job per seed: preflight first (packages, binaries, GPUs, disk, verified data; it fails
# in seconds with the list of what is missing), then torchrun with one process per GPU (one process on CPU).
#
#   results/<run>/seed<seed>/train/checkpoint/{model.pt,checkpoint.json}, metrics.jsonl, train_summary.json
#   results/<run>/seed<seed>/logs/{train.log, preflight.json}
#
# A sweep with train.resume_every_steps > 0 saves its state under train/resume/ (no rule declares it, so Snakemake
# never deletes it) and an interrupted job, run again, resumes from there; a record run starts over, saying so.
# The folder also keeps a copy of the log (Snakemake deletes a job's log before running it again: the new log starts
# with the copy) and, with --keep-resume, the last step's state. Only the shell removes it, once torchrun succeeded:
# a job killed while its processes exit resumes at the end instead of training again from step 0.


from pgolf.config import DataConfig

# The data fields preflight reads (pgolf/compliance/preflight.py) or RunConfig checks; the others (where the data
# comes from, the data stage's process count) reach training through verified.json, an input, when they matter.
PREFLIGHT_DATA_KEYS = ("name", "source", "docs_path", "val_docs", "train_shards", "shard_tokens",
                       "val_duplicates_policy", "max_val_overlap_fraction")


def preflight_recipe():
    """What preflight checks, from the sections training owns anyway (plus data and mode): a knob of a later
    stage must not change the training job's params, or it would retrain every seed."""
    recipe = {key: getattr(CFG, key) for key in ("run", "mode", "model", "optim", "train")}
    recipe = {k: v if isinstance(v, str) else to_dict(v) for k, v in recipe.items()}
    data = to_dict(CFG.data)
    recipe["data"] = {**to_dict(DataConfig()), **{key: data[key] for key in PREFLIGHT_DATA_KEYS}}
    # what RunConfig checks against the model and the data source
    recipe["tokenizer"] = {"vocab_size": CFG.tokenizer.vocab_size, "source": CFG.tokenizer.source}
    # the one evaluate key RunConfig checks against training (equal to train.param_storage, so it changes nothing)
    recipe["evaluate"] = {"param_storage": CFG.evaluate.param_storage}
    return json.dumps(recipe, sort_keys=True)


def train_dir(seed):
    return f"{RUN_DIR}/seed{seed}/train"


rule train:
    input:
        verified=DATA_VERIFIED,
        shards=SHARDS_DIR,
    output:
        checkpoint=f"{RUN_DIR}/seed{{seed}}/train/checkpoint/checkpoint.json",
        weights=f"{RUN_DIR}/seed{{seed}}/train/checkpoint/model.pt",
        summary=f"{RUN_DIR}/seed{{seed}}/train/train_summary.json",
        metrics=f"{RUN_DIR}/seed{{seed}}/train/metrics.jsonl",
    params:
        preflight=preflight_recipe(),
        data_root=DATA_DIR,
        model=section_json("model"),
        optim=section_json("optim"),
        train=section_json("train"),
        out_dir=lambda wc: train_dir(wc.seed),
        # preflight's report: beside the logs, declared nowhere (Snakemake neither deletes nor prints it)
        preflight_json=lambda wc: f"{RUN_DIR}/seed{wc.seed}/logs/preflight.json",
    threads: workflow.cores
    resources:
        gpus=VISIBLE_GPUS,
        gpu_jobs=1,
    log:
        f"{RUN_DIR}/seed{{seed}}/logs/train.log",
    shell:
        # everything into the log; the [progress] lines (steps, loss, tokens/s, ETA) also onto the console
        "rm -f {log}; ( pgolf preflight --config-json {params.preflight:q} --seed {wildcards.seed}"
        " --data-dir {params.data_root} --json-out {params.preflight_json} && "
        "torchrun --standalone --nproc_per_node $(( {resources.gpus} > 0 ? {resources.gpus} : 1 )) -m pgolf.train"
        " --model-json '{params.model}' --optim-json '{params.optim}' --train-json '{params.train}'"
        " --seed {wildcards.seed} --data-dir {input.shards} --out-dir {params.out_dir} --keep-resume ) 2>&1"
        " | python -m pgolf.io {log} --label 'train seed {wildcards.seed}' --carry {params.out_dir}/resume/train.log"
        " && rm -rf {params.out_dir}/resume"
