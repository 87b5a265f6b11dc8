"""Command groups of the data stage: ``pgolf data ...``, ``pgolf caseops ...``, ``pgolf tokenizer ...``.

These functions only parse arguments and call the library; the work lives in the sibling modules.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pgolf.config import DataConfig, TokenizerConfig, load_run_config, section_from_json
from pgolf.config.strict import nonneg_int, positive_int
from pgolf.config.training import DEFAULT_MAX_VAL_OVERLAP_FRACTION, VAL_DUPLICATES_POLICIES


def _section(args: argparse.Namespace, cls: type, name: str):
    """A stage section from ``--NAME-json`` (what Snakemake passes) or from ``--config FILE`` (people)."""
    text = getattr(args, f"{name}_json", None)
    if text:
        return section_from_json(cls, text, f"--{name}-json")
    if getattr(args, "config", None):
        return getattr(load_run_config(args.config), name)
    raise ValueError(f"give --config FILE or --{name}-json JSON")


# ------------------------------------------------------------------------------------------------------ caseops


def _read_stdin_utf8() -> str:
    """All of stdin as UTF-8, whatever the locale says (bytes in, so CRLF and U+E00x pass through untouched)."""
    data = sys.stdin.buffer.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"stdin: not valid UTF-8 ({exc})") from None


def _write_stdout_utf8(text: str) -> None:
    sys.stdout.buffer.write(text.encode("utf-8"))
    sys.stdout.buffer.flush()


def _caseops_encode(args: argparse.Namespace) -> int:
    from pgolf.data import caseops

    _write_stdout_utf8(caseops.encode(_read_stdin_utf8()))
    return 0


def _caseops_decode(args: argparse.Namespace) -> int:
    from pgolf.data import caseops

    _write_stdout_utf8(caseops.decode(_read_stdin_utf8()))
    return 0


# ---------------------------------------------------------------------------------------------------- tokenizer


def _tokenizer_train(args: argparse.Namespace) -> int:
    from pgolf.data import tokenizer

    tokenizer.train_tokenizer_from_jsonl(
        docs_path=Path(args.docs),
        out_path=Path(args.out),
        vocab_size=args.vocab_size,
        caseops=not args.no_caseops,
        skip_docs=args.skip_docs,
        max_docs=args.max_docs,
        max_sentence_chars=args.max_sentence_chars,
    )
    return 0


# --------------------------------------------------------------------------------------------------------- data


def _data_prepare(args: argparse.Namespace) -> int:
    from pgolf.data import prepare

    prepare.prepare_shards(
        docs_path=Path(args.docs),
        tokenizer_path=Path(args.tokenizer),
        out_dir=Path(args.out),
        val_docs=args.val_docs,
        shard_tokens=args.shard_tokens,
        workers=args.workers,
        caseops=not args.no_caseops,
        max_docs=args.max_docs,
        max_train_shards=args.max_train_shards,
        val_duplicates_policy=args.val_duplicates_policy,
        max_val_overlap_fraction=args.max_val_overlap_fraction,
    )
    return 0


def _data_verify(args: argparse.Namespace) -> int:
    from pgolf.data import verify

    report = verify.verify_dir(
        Path(args.dir),
        expected_val_docs=args.val_docs,
        record=args.record,
        val_duplicates_policy=args.val_duplicates_policy,
        max_val_overlap_fraction=args.max_val_overlap_fraction,
    )
    verify.print_report(report)
    if args.json_out:
        from pgolf.io import atomic_write_json

        atomic_write_json(args.json_out, report.to_dict())
    return 0 if report.ok else 1


def _data_download(args: argparse.Namespace) -> int:
    from pgolf.data import hub

    if args.what == "docs":
        hub.download_docs(_section(args, DataConfig, "data"), Path(args.out))
    elif args.what == "export":
        hub.download_export(_section(args, DataConfig, "data"), Path(args.out))
    else:
        hub.download_tokenizer(_section(args, TokenizerConfig, "tokenizer"), Path(args.out))
    return 0


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1], got {text!r}")
    return value


def _add_duplicates_options(parser: argparse.ArgumentParser, policy_help: str) -> None:
    """Training copies of validation documents (DataConfig.val_duplicates_policy, max_val_overlap_fraction)."""
    parser.add_argument(
        "--val-duplicates-policy", choices=VAL_DUPLICATES_POLICIES, default="drop_train_copies", help=policy_help
    )
    parser.add_argument(
        "--max-val-overlap-fraction",
        type=_fraction,
        default=DEFAULT_MAX_VAL_OVERLAP_FRACTION,
        help="fail, under either policy, when more than this fraction of the validation documents has a copy in "
        f"training (the split itself is wrong; default {DEFAULT_MAX_VAL_OVERLAP_FRACTION})",
    )


def register(sub: argparse._SubParsersAction) -> None:
    # pgolf caseops encode|decode
    caseops_p = sub.add_parser("caseops", help="CaseOps transform, stdin to stdout (UTF-8)")
    caseops_sub = caseops_p.add_subparsers(dest="caseops_command", required=True)
    caseops_sub.add_parser("encode", help="original text -> CaseOps text").set_defaults(func=_caseops_encode)
    caseops_sub.add_parser("decode", help="CaseOps text -> original text").set_defaults(func=_caseops_decode)

    # pgolf tokenizer train
    tok_p = sub.add_parser("tokenizer", help="SentencePiece tokenizer tools")
    tok_sub = tok_p.add_subparsers(dest="tokenizer_command", required=True)
    train_p = tok_sub.add_parser("train", help="train a SentencePiece BPE model with the canonical settings")
    train_p.add_argument("--docs", required=True, help="JSONL file, one {'text': ...} object per line")
    train_p.add_argument("--out", required=True, help="output .model path")
    train_p.add_argument("--vocab-size", type=positive_int, required=True)
    train_p.add_argument("--no-caseops", action="store_true", help="no CaseOps transform, no reserved operator ids")
    train_p.add_argument("--skip-docs", type=nonneg_int, default=0, help="skip the first N docs (the validation split)")
    train_p.add_argument("--max-docs", type=nonneg_int, default=0, help="train on at most N docs (0 = all)")
    train_p.add_argument("--max-sentence-chars", type=positive_int, default=16384,
                         help="cut texts into pieces of at most N characters for the trainer (default 16384)")
    train_p.set_defaults(func=_tokenizer_train)

    # pgolf data prepare|verify|download
    data_p = sub.add_parser("data", help="prepare, verify and download data")
    data_sub = data_p.add_subparsers(dest="data_command", required=True)

    prep = data_sub.add_parser("prepare", help="tokenize documents into BOS-correct shards + byte sidecar")
    prep.add_argument("--docs", required=True, help="JSONL file, one {'text': ...} object per line")
    prep.add_argument("--tokenizer", required=True, help="SentencePiece .model file")
    prep.add_argument("--out", required=True, help="output directory (shards, sidecar and manifest.json)")
    prep.add_argument("--val-docs", type=positive_int, required=True, help="the first N documents are validation")
    prep.add_argument("--shard-tokens", type=positive_int, default=100_000_000)
    prep.add_argument("--workers", type=nonneg_int, default=0, help="tokenization processes (0 = all cores)")
    prep.add_argument("--no-caseops", action="store_true", help="tokenize without the CaseOps transform")
    prep.add_argument("--max-docs", type=nonneg_int, default=0, help="read at most N documents (0 = all)")
    prep.add_argument("--max-train-shards", type=nonneg_int, default=0, help="stop after N train shards (0 = no cap)")
    _add_duplicates_options(
        prep,
        "training documents equal to a validation document: drop_train_copies (default: not written, counted in "
        "the manifest) or refuse (an error naming the first one's file and line)",
    )
    prep.set_defaults(func=_data_prepare)

    ver = data_sub.add_parser("verify", help="check shards, sidecar, BOS, disjointness and doc counts")
    ver.add_argument("dir", help="directory written by `pgolf data prepare` or `pgolf data download`")
    ver.add_argument("--val-docs", type=positive_int, default=None, help="expected validation doc count")
    ver.add_argument("--record", action="store_true", help="refuse anything but the official 50,000 val docs")
    ver.add_argument("--json-out", default=None, help="also write the report as JSON")
    _add_duplicates_options(
        ver,
        "validation documents with a copy in the training shards of a directory without a pgolf manifest (a "
        "published export): drop_train_copies (default: accepted as published, counted) or refuse",
    )
    ver.set_defaults(func=_data_verify)

    dl = data_sub.add_parser("download", help="download raw docs, an export or a tokenizer from the Hub")
    dl.add_argument("what", choices=["docs", "export", "tokenizer"])
    dl.add_argument("--out", required=True, help="output directory (docs/export) or file (tokenizer)")
    dl.add_argument("--config", default=None, help="recipe YAML (its data/tokenizer sections are used)")
    dl.add_argument("--data-json", default=None, help="the data section as JSON (what Snakemake passes)")
    dl.add_argument("--tokenizer-json", default=None, help="the tokenizer section as JSON")
    dl.set_defaults(func=_data_download)
