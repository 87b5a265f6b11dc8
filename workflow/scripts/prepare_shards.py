"""Rule prepare_shards: documents -> BOS-correct shards + byte sidecar + manifest, on snakemake.threads workers."""
from pathlib import Path

from pgolf.io import run_logged


def work():
    from pgolf.data.prepare import prepare_shards

    p = snakemake.params
    prepare_shards(docs_path=Path(snakemake.input.docs), tokenizer_path=Path(snakemake.input.tokenizer),
                   out_dir=Path(snakemake.output[0]), val_docs=p.val_docs, shard_tokens=p.shard_tokens,
                   workers=snakemake.threads, caseops=p.caseops, max_docs=p.max_docs,
                   max_train_shards=p.max_train_shards, val_duplicates_policy=p.val_duplicates_policy,
                   max_val_overlap_fraction=p.max_val_overlap_fraction)


if __name__ == "__main__":  # not in the worker processes that multiprocessing spawns from this file
    run_logged(snakemake.log[0], work, "prepare_shards")
