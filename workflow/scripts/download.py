"""Rules download_docs, download_export, download_tokenizer: files from the Hugging Face Hub, verified."""
from pathlib import Path

from pgolf.config import DataConfig, TokenizerConfig, section_from_json
from pgolf.io import run_logged


def work():
    from pgolf.data import hub

    what = snakemake.params.what
    if what == "tokenizer":
        hub.download_tokenizer(section_from_json(TokenizerConfig, snakemake.params.section, "tokenizer"), Path(snakemake.output[0]))
    elif what == "docs":
        hub.download_docs(section_from_json(DataConfig, snakemake.params.section, "data"), Path(snakemake.params.out_dir))
    else:
        hub.download_export(section_from_json(DataConfig, snakemake.params.section, "data"), Path(snakemake.output[0]))


if __name__ == "__main__":  # not in the worker processes that multiprocessing spawns from this file
    run_logged(snakemake.log[0], work, f"download {snakemake.params.what}")
