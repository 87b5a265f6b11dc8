# The data stage: documents -> tokenizer -> BOS-correct shards + byte sidecar + manifest -> verification gate.
#
# Outputs under results/data/<data.name>/:
#   raw/docs_selected.jsonl   (source=docs: the Hub's documents, sha256-verified)
#   tokenizer.model           (source=train|hub|path; source=export keeps it inside shards/)
#   shards/                   fineweb_{train,val}_NNNNNN.bin, fineweb_val_bytes_NNNNNN.bin, manifest.json
#   verified.json             the verification report; training depends on it

from pgolf.config.training import DEFAULT_MAX_VAL_OVERLAP_FRACTION, VAL_DUPLICATES_POLICIES

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
# The downloads do not depend on what the data stage later does with duplicates across the split: those keys are
# pinned in their params, so changing them reruns preparation / verification, never a download.
DOWNLOAD_NEUTRAL = dict(
    workers=0,
    name="",
    val_duplicates_policy=VAL_DUPLICATES_POLICIES[0],
    max_val_overlap_fraction=DEFAULT_MAX_VAL_OVERLAP_FRACTION,
)
DATA_VERIFIED = f"{DATA_DIR}/verified.json"


if D.source == "docs":

    rule download_docs:
        output:
            docs=f"{DATA_DIR}/raw/docs_selected.jsonl",
        params:
            what="docs",
            section=section_json("data", **DOWNLOAD_NEUTRAL),
            out_dir=f"{DATA_DIR}/raw",
        log:
            f"{DATA_DIR}/logs/download_docs.log",
        script:
            "../scripts/download.py"


if D.source == "export":

    rule download_export:
        output:
            directory(SHARDS_DIR),
        params:
            what="export",
            section=section_json("data", **DOWNLOAD_NEUTRAL),
        log:
            f"{DATA_DIR}/logs/download_export.log",
        script:
            "../scripts/download.py"

else:

    if T.source == "hub":

        rule download_tokenizer:
            output:
                TOKENIZER_PATH,
            params:
                what="tokenizer",
                section=section_json("tokenizer"),
            log:
                f"{DATA_DIR}/logs/download_tokenizer.log",
            script:
                "../scripts/download.py"

    elif T.source == "train":

        rule train_tokenizer:
            """Train on the TRAINING split only: the first val_docs documents are skipped."""
            input:
                docs=DOCS_PATH,
            output:
                TOKENIZER_PATH,
            params:
                vocab_size=T.vocab_size,
                caseops=T.caseops,
                skip_docs=D.val_docs,
                max_docs=T.train_docs,
            log:
                f"{DATA_DIR}/logs/train_tokenizer.log",
            script:
                "../scripts/train_tokenizer.py"

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
            caseops=T.caseops,
            val_duplicates_policy=D.val_duplicates_policy,
            max_val_overlap_fraction=D.max_val_overlap_fraction,
        threads: D.workers if D.workers > 0 else workflow.cores
        log:
            f"{DATA_DIR}/logs/prepare_shards.log",
        script:
            "../scripts/prepare_shards.py"


rule verify_data:
    """The gate in front of training: BOS per document, sidecar, disjoint splits, the validation doc count.

    An export (no pgolf manifest) may keep a few exact duplicates across its published split: counted in
    verified.json (summary.train_val_overlap_docs) and accepted up to data.max_val_overlap_fraction."""
    input:
        SHARDS_DIR,
    output:
        DATA_VERIFIED,
    params:
        val_docs=D.val_docs,
        record=CFG.mode == "record",
        val_duplicates_policy=D.val_duplicates_policy,
        max_val_overlap_fraction=D.max_val_overlap_fraction,
    log:
        f"{DATA_DIR}/logs/verify_data.log",
    script:
        "../scripts/verify_data.py"
