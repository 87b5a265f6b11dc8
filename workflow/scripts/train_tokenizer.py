"""Rule train_tokenizer: a SentencePiece model trained on the TRAINING split only (validation documents skipped)."""
from pathlib import Path

from pgolf.io import progress, run_logged


def work():
    from pgolf.data.tokenizer import train_tokenizer_from_jsonl

    p = snakemake.params
    train_tokenizer_from_jsonl(docs_path=Path(snakemake.input.docs), out_path=Path(snakemake.output[0]),
                               vocab_size=p.vocab_size, caseops=p.caseops, skip_docs=p.skip_docs, max_docs=p.max_docs,
                               max_sentence_chars=p.max_sentence_chars)
    progress(f"{snakemake.output[0]}: vocabulary {p.vocab_size:,}", final=True)


if __name__ == "__main__":  # not in the worker processes that multiprocessing spawns from this file
    run_logged(snakemake.log[0], work, "train_tokenizer")
