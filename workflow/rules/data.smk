# The data stage: documents -> tokenizer -> BOS-correct shards + byte sidecar + manifest -> verification gate.
#
# Outputs under results/data/<data.name>/:
#   raw/<docs_file's name>    (source=docs: the Hub's documents, sha256-verified; docs_selected.jsonl by default)
#   tokenizer.model           (source=train|hub|path; source=export keeps it inside shards/)
#   shards/                   fineweb_{train,val}_NNNNNN.bin, fineweb_val_bytes_NNNNNN.bin, manifest.json
#   verified.json             the verification report; training depends on it

from pathlib import PurePosixPath

from pgolf.config import DataConfig, TokenizerConfig

D = CFG.data
T = CFG.tokenizer

if D.source == "local":
    DOCS_PATH = D.docs_path
elif D.source == "docs":
    DOCS_PATH = f"{DATA_DIR}/raw/{PurePosixPath(D.docs_file).name}"  # where pgolf.data.hub.download_docs puts it
else:
    DOCS_PATH = None

if D.source == "export":
    TOKENIZER_PATH = f"{DATA_DIR}/shards/tokenizer.model"
elif T.source == "path":
    TOKENIZER_PATH = T.path
else:
    TOKENIZER_PATH = f"{DATA_DIR}/tokenizer.model"

SHARDS_DIR = f"{DATA_DIR}/shards"


def download_section(section, reads):
    """A download's params: the fields of the section it reads (pgolf/data/hub.py), every other field at its
    default, so that a knob of preparation, verification or training never downloads again."""
    defaults = to_dict({"data": DataConfig, "tokenizer": TokenizerConfig}[section]())
    return section_json(section, **{key: value for key, value in defaults.items() if key not in reads})


HUB_PIN = ("hub_repo", "revision")
DATA_VERIFIED = f"{DATA_DIR}/verified.json"


if D.source == "docs":

    rule download_docs:
        output:
            docs=DOCS_PATH,
        params:
            what="docs",
            section=download_section("data", (*HUB_PIN, "docs_file", "docs_manifest_file")),
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
            section=download_section("data", (*HUB_PIN, "export_variant", "train_shards")),
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
                section=download_section("tokenizer", (*HUB_PIN, "filename")),
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
                max_sentence_chars=T.train_max_sentence_chars,
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
