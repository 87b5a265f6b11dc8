# The data stage: documents -> tokenizer -> BOS-correct shards + byte sidecar + manifest -> verification gate.
#
# Outputs under results/data/<data.name>/:
#   raw/docs_selected.jsonl   (source=docs: the Hub's documents, sha256-verified)
#   tokenizer.model           (source=train|hub|path; source=export keeps it inside shards/)
#   shards/                   fineweb_{train,val}_NNNNNN.bin, fineweb_val_bytes_NNNNNN.bin, manifest.json
#   verified.json             the verification report; training depends on it

D = CFG.data
T = CFG.tokenizer

if D.source == "local":
    DOCS_PATH = D.docs_path
elif D.source == "docs":
    DOCS_PATH = f"{DATA_DIR}/raw/docs_selected.jsonl"
else:
    DOCS_PATH = None

if D.source == "export":
    TOKENIZER_PATH = f"{DATA_DIR}/shards/tokenizer.model"
elif T.source == "path":
    TOKENIZER_PATH = T.path
else:
    TOKENIZER_PATH = f"{DATA_DIR}/tokenizer.model"

SHARDS_DIR = f"{DATA_DIR}/shards"
DATA_VERIFIED = f"{DATA_DIR}/verified.json"


if D.source == "docs":

    rule download_docs:
        output:
            docs=f"{DATA_DIR}/raw/docs_selected.jsonl",
        params:
            data=section_json("data", workers=0, name=""),
            raw_dir=f"{DATA_DIR}/raw",
        log:
            f"{DATA_DIR}/logs/download_docs.log",
        shell:
            "pgolf data download docs --out {params.raw_dir} --data-json '{params.data}' > {log} 2>&1"


if D.source == "export":

    rule download_export:
        output:
            directory(SHARDS_DIR),
        params:
            data=section_json("data", workers=0, name=""),
        log:
            f"{DATA_DIR}/logs/download_export.log",
        shell:
            "pgolf data download export --out {output} --data-json '{params.data}' > {log} 2>&1"

else:

    if T.source == "hub":

        rule download_tokenizer:
            output:
                TOKENIZER_PATH,
            params:
                tokenizer=section_json("tokenizer"),
            log:
                f"{DATA_DIR}/logs/download_tokenizer.log",
            shell:
                "pgolf data download tokenizer --out {output} --tokenizer-json '{params.tokenizer}' > {log} 2>&1"

    elif T.source == "train":

        rule train_tokenizer:
            """Train on the TRAINING split only: the first val_docs documents are skipped."""
            input:
                docs=DOCS_PATH,
            output:
                TOKENIZER_PATH,
            params:
                vocab_size=T.vocab_size,
                caseops="" if T.caseops else "--no-caseops",
                skip_docs=D.val_docs,
                max_docs=T.train_docs,
            log:
                f"{DATA_DIR}/logs/train_tokenizer.log",
            shell:
                "pgolf tokenizer train --docs {input.docs} --out {output} --vocab-size {params.vocab_size}"
                " {params.caseops} --skip-docs {params.skip_docs} --max-docs {params.max_docs} > {log} 2>&1"

    rule prepare_shards:
        """Tokenize in parallel; `workers` is not a param because it never changes the output."""
        input:
            docs=DOCS_PATH,
            tokenizer=TOKENIZER_PATH,
        output:
            directory(SHARDS_DIR),
        params:
            val_docs=D.val_docs,
            shard_tokens=D.shard_tokens,
            max_docs=D.max_docs,
            max_train_shards=D.train_shards,
            caseops="" if T.caseops else "--no-caseops",
        threads: D.workers if D.workers > 0 else workflow.cores
        log:
            f"{DATA_DIR}/logs/prepare_shards.log",
        shell:
            "pgolf data prepare --docs {input.docs} --tokenizer {input.tokenizer} --out {output}"
            " --val-docs {params.val_docs} --shard-tokens {params.shard_tokens} --workers {threads}"
            " --max-docs {params.max_docs} --max-train-shards {params.max_train_shards} {params.caseops} > {log} 2>&1"


rule verify_data:
    """The gate in front of training: BOS per document, sidecar, disjoint splits, the validation doc count."""
    input:
        SHARDS_DIR,
    output:
        DATA_VERIFIED,
    params:
        val_docs=D.val_docs,
        record="--record" if CFG.mode == "record" else "",
    log:
        f"{DATA_DIR}/logs/verify_data.log",
    shell:
        "pgolf data verify {input} --val-docs {params.val_docs} {params.record} --json-out {output} > {log} 2>&1"
