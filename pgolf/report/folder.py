"""The submission folder ``records/track_10min_16mb/YYYY-MM-DD_<Name>/`` and ``pgolf check-folder``.

It holds README.md (results table and the exact reproduction command), submission.json, the bundled train_gpt.py,
one log per seed (``train_seed<s>.log``: the stage logs plus a machine-readable summary line) and requirements.txt.
Each seed log ends with one line ``pgolf_seed_summary {json}`` carrying the seed's figures and the sha256 of
train_gpt.py; :func:`check_folder` recomputes every figure of submission.json from those lines, recompiles and
rehashes train_gpt.py, and applies the size gate, so a hand-edited json or a swapped script is caught.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Optional, Sequence

from pgolf.artifact.minify import CODE_BYTES_CONVENTIONS, TAG_MESSAGES_FILE
from pgolf.io import atomic_dir, atomic_write_json, read_json, sha256_bytes
from pgolf.report.submission import (
    DEFAULT_REPRODUCE_COMMAND,
    FIGURE_ABS_TOLERANCE,
    OPTIONAL_PREFIX,
    REQUIRED_FOLDER_FILES,
    SIZE_CAP_BYTES,
    SUMMARY_PREFIX,
    TRACK_DIR,
    CodeBundle,
    SubmissionError,
    requirements_text,
    third_party_imports,
)
from pgolf.report.results import RECORD_WORLD_SIZE
from pgolf.report.schema import SUBMISSION_SCHEMA, validate
from pgolf.report.summary import summary_text


def seed_log_name(seed: int) -> str:
    return f"train_seed{seed}.log"


def seed_summary(s: Any, run: str, train_gpt_sha256: str) -> dict:
    """The seed log's machine-readable last line: every figure the log's own header and evaluation summary print
    (so that check-folder can render them again and hold the text a reader sees to it)."""
    return {
        "run": run,
        "seed": s.seed,
        "val_loss": s.val_loss,
        "val_bpb": s.val_bpb,
        "token_count": s.token_count,
        "byte_sum": s.byte_sum,
        "artifact_bytes": s.total_bytes,
        "model_bytes": s.model_bytes,
        "code_bytes": s.code_bytes,
        "steps": s.steps,
        "train_seconds": s.train_seconds,
        "step_avg_ms": s.ms_per_step,
        "eval_time_s": s.eval_total_s,
        "eval_load_s": s.eval_load_s,
        "eval_warmup_s": s.eval_warmup_s,
        "eval_score_s": s.eval_score_s,
        "artifact_sha256": s.artifact_sha256,
        "code_hash": s.code_hash,
        "data_manifest_sha256": s.data_manifest_sha256,
        "train_gpt_sha256": train_gpt_sha256,
    }


EVALUATION_MARKER = "===== evaluation summary (eval/eval.json) ====="


def summary_lines(summary: dict) -> tuple[list[str], list[str]]:
    """(header lines, evaluation-summary lines) of a seed log, rendered from its summary line's figures."""
    m = summary
    header = [
        f"pgolf seed log: run {m['run']}, seed {m['seed']}",
        f"train_gpt.py sha256: {m['train_gpt_sha256']}",
        f"pgolf code hash (training): {m['code_hash']}",
        f"data manifest sha256: {m['data_manifest_sha256']}",
    ]
    evaluation = [
        f"val_loss {m['val_loss']:.8f} nats/token  val_bpb {m['val_bpb']:.8f}  ({m['token_count']:,} target tokens, "
        f"{m['byte_sum']:,} bytes)",
        f"eval time {m['eval_time_s']:.1f} s (load {m['eval_load_s']:.1f} + warm-up {m['eval_warmup_s']:.1f} + "
        f"score {m['eval_score_s']:.1f})",
        f"train: {m['steps']} steps, {m['train_seconds']:.1f} s, {m['step_avg_ms']:.2f} ms/step",
        f"artifact {m['artifact_bytes']:,} bytes (model {m['model_bytes']:,} + code {m['code_bytes']:,}), "
        f"sha256 {m['artifact_sha256']}",
    ]
    return header, evaluation


def render_seed_log(s: Any, run: str, train_gpt_sha256: str) -> str:
    """One seed's log: header, every stage log of the seed, the evaluation summary, the summary line."""
    summary = seed_summary(s, run, train_gpt_sha256)
    header, evaluation = summary_lines(summary)
    parts = [*header, ""]
    for log in s.log_files:
        parts += [
            f"===== {log.parent.name}/{log.name} =====",
            log.read_text(encoding="utf-8", errors="replace").rstrip(),
            "",
        ]
    if not s.log_files:
        parts += ["(no stage logs were found under logs/)", ""]
    parts += [EVALUATION_MARKER, *evaluation, SUMMARY_PREFIX + json.dumps(summary, sort_keys=True)]
    return "\n".join(parts) + "\n"


def log_text_problems(path: Path, summary: dict) -> list[str]:
    """Where the lines a reader sees in a seed log (its header, its evaluation summary) differ from the figures of
    its summary line: an edited log that kept its summary line."""
    try:
        header, evaluation = summary_lines(summary)
    except (KeyError, TypeError, ValueError) as exc:
        return [f"{path}: the summary line lacks a figure the log prints ({exc!r})"]
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    problems = []
    if lines[: len(header)] != header:
        problems.append(f"{path}: its header is not the one its summary line gives ({' / '.join(header)})")
    if EVALUATION_MARKER not in lines:
        return problems + [f"{path}: no '{EVALUATION_MARKER}' block"]
    start = len(lines) - lines[::-1].index(EVALUATION_MARKER)  # just after the last marker
    shown = [ln for ln in lines[start:] if not ln.startswith(SUMMARY_PREFIX)]
    for expected, line in zip(evaluation, shown + [""] * len(evaluation)):
        if line != expected:
            problems.append(f"{path}: the evaluation summary says {line!r}, its summary line gives {expected!r}")
    if len(shown) > len(evaluation):
        problems.append(f"{path}: {len(shown) - len(evaluation)} more line(s) in the evaluation summary than pgolf writes")
    return problems


def parse_seed_log(path: Path) -> dict:
    """The summary of a seed log (its last ``pgolf_seed_summary`` line)."""
    lines = [
        ln for ln in path.read_text(encoding="utf-8", errors="replace").splitlines() if ln.startswith(SUMMARY_PREFIX)
    ]
    if not lines:
        raise SubmissionError(f"{path}: no '{SUMMARY_PREFIX.strip()}' line")
    try:
        summary = json.loads(lines[-1][len(SUMMARY_PREFIX) :])
    except json.JSONDecodeError as exc:
        raise SubmissionError(f"{path}: summary line is not valid JSON ({exc})") from None
    if not isinstance(summary, dict):
        raise SubmissionError(f"{path}: summary line must hold a JSON object")
    return summary


# --------------------------------------------------------------------------------------------------------------
# The folder
# --------------------------------------------------------------------------------------------------------------


def folder_name(date: str, name: str) -> str:
    return f"{date}_{name}"


def seed_command(command: str, seed: int, nproc: Optional[int] = None) -> str:
    """``command`` with each ``{seed}`` replaced by the seed and each ``{nproc}`` by the process count the seed ran
    with (the record track's 8 where the results do not say); nothing else in it is touched (a shell's ``${VAR}``
    stays as written)."""
    return command.replace("{seed}", str(seed)).replace("{nproc}", str(nproc or RECORD_WORLD_SIZE))


def _f8(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.8f}"


def headline(val_bpb_mean: float) -> str:
    return f"**val_bpb {val_bpb_mean:.8f}**"


def results_row(m: dict) -> str:
    """A seed's row of the README's results table, from its seed log's summary line."""
    return (f"| {m['seed']} | {m['val_loss']:.8f} | {m['val_bpb']:.8f} | {m['steps']} | {m['step_avg_ms']:.2f} | "
            f"{m['artifact_bytes']:,} | {m['train_seconds']:.1f} | {m['eval_time_s']:.1f} |")


def readme_problems(path: Path, sub: dict, logs: dict[int, dict]) -> list[str]:
    """Where the README's headline and results table differ from submission.json and the seed logs (the figures a
    reader sees first; the rest of its text is prose check-folder does not recompute)."""
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    problems = []
    if not any(line.startswith(headline(sub["val_bpb"])) for line in lines):
        problems.append(f"{path}: no headline {headline(sub['val_bpb'])} (submission.json's mean val_bpb)")
    for seed, summary in sorted(logs.items()):
        try:
            row = results_row(summary)
        except (KeyError, TypeError, ValueError):
            continue  # log_text_problems names the missing figure
        if row not in lines:
            problems.append(f"{path}: no results row {row!r} (seed {seed}'s log)")
    return problems


def readme_text(agg: dict, sub: dict, seeds: Sequence[Any], reproduce_command: str, recipe: Optional[str],
                has_messages: bool = False) -> str:
    loss, bpb, sig = agg["val_loss_nats_per_token"], agg["val_bpb"], agg["significance"]
    lines = [
        f"# {sub['name']}",
        "",
        f"{headline(bpb['mean'])} (mean of {bpb['n']} seed(s); "
        f"sample std, ddof=1: {_f8(bpb['std_sample_ddof1'])}), "
        f"val_loss {loss['mean']:.8f} nats per token. Verdict: **{agg['verdict']['status']}**.",
        "",
    ]
    if sub["blurb"]:
        lines += [sub["blurb"], ""]
    if sub["technique_summary"]:
        lines += [f"Techniques: {sub['technique_summary']}", ""]
    lines += [
        "## Results",
        "",
        "| seed | val_loss (nats/token) | val_bpb | steps | ms/step | artifact bytes | train s | eval s |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [results_row(seed_summary(s, agg["run"], sub["provenance"]["train_gpt_sha256"])) for s in seeds]
    lines += [
        "",
        f"Mean val_bpb {bpb['mean']:.8f}; sample std (ddof=1) {_f8(bpb['std_sample_ddof1'])}; "
        f"population std (ddof=0) {_f8(bpb['std_population_ddof0'])}. "
        f"Artifact bytes = compressed model + counted code ({agg['provenance']['code_bytes_convention']} "
        f"convention), cap {SIZE_CAP_BYTES:,}.",
        "",
    ]
    if agg["missing_seeds"]:
        lines += ["## Missing seeds", ""]
        lines += [f"- seed {m['seed']}: {m['reason']}" for m in agg["missing_seeds"]]
        lines.append("")
    lines += ["## Significance", "", "```", summary_text(agg).rstrip(), "```", ""]
    if sig.get("note"):
        lines += [f"Note: {sig['note']}.", ""]
    if agg["provenance"]["notes"] or agg["provenance"]["mixed"]:
        lines += ["## Provenance notes", ""]
        lines += [f"- {note}" for note in agg["provenance"]["notes"]]
        lines += [
            f"- mixed provenance, pooled because allowed: {d['label']}: "
            + "; ".join(f"{value[:16]} (seeds {seeds_})" for value, seeds_ in d["values"].items())
            for d in agg["provenance"]["mixed"]
        ]
        lines.append("")
    seed_list = " ".join(str(s.seed) for s in seeds)
    lines += ["## Reproduce", ""]
    if all(s.on_record_hardware for s in seeds):  # the report's budget lines follow the same predicate
        where = f"From inside this folder, on {sub['hardware']}, for each seed in {seed_list},"
    else:
        made_on = "; ".join(sorted({s.hardware_words for s in seeds}))
        lines += [
            f"This run was made on {made_on}, in {agg['mode']} mode: it is not a record, and its times say nothing "
            "about the 600 s budgets. A record run of this code needs 8xH100 SXM (8 processes, one per GPU).",
            "",
        ]
        where = f"To rerun it from inside this folder, for each seed in {seed_list},"
    lines += [
        where,
        f"with the verified validation and training shards (data manifest sha256 "
        f"{str(agg['provenance']['data_manifest_sha256'])[:16]}...) under `./data/`:",
        "",
        "```bash",
        "pip install -r requirements.txt",
        *[seed_command(reproduce_command, s.seed, s.world_size) for s in seeds],
        "```",
        "",
    ]
    if recipe:
        lines += [
            f"With the pgolf pipeline (code hash {agg['provenance']['code_hash'][:16]}...):",
            "",
            "```bash",
            f"snakemake --cores all --configfile {recipe}",
            "```",
            "",
        ]
    lines += [
        "## Files",
        "",
        "- `submission.json`: figures, provenance (code hash, data manifest sha256, config sha256, environment) "
        "and the significance test",
        "- `train_gpt.py`: the bundled training + evaluation script",
        *[f"- `{seed_log_name(s.seed)}`: stage logs and the evaluation summary of seed {s.seed}" for s in seeds],
        "- `requirements.txt`: third-party packages `train_gpt.py` imports",
        *([f"- `{TAG_MESSAGES_FILE}`: the text of each error tag `train_gpt.py` can print (its shipped form raises "
           "errors as `<module>:<line>` tags of pgolf's sources, to save counted bytes)"] if has_messages else []),
        "",
    ]
    return "\n".join(lines)


def write_folder(
    out_dir: Path,
    agg: dict,
    sub: dict,
    seeds: Sequence[Any],
    bundle: CodeBundle,
    reproduce_command: Optional[str] = None,
    recipe: Optional[str] = None,
) -> Path:
    """Write records/track_10min_16mb/<date>_<name>/ atomically (complete or absent); returns its path."""
    folder = Path(out_dir) / "records" / TRACK_DIR / folder_name(sub["date"], sub["name"])
    command = reproduce_command or bundle.meta.get("run_command") or DEFAULT_REPRODUCE_COMMAND
    source = bundle.path.read_bytes()
    env = agg["provenance"]["environment"]
    with atomic_dir(folder, "submission.json") as tmp:
        (tmp / "train_gpt.py").write_bytes(source)
        atomic_write_json(tmp / "submission.json", sub)
        for s in seeds:
            (tmp / seed_log_name(s.seed)).write_text(render_seed_log(s, agg["run"], bundle.sha256), encoding="utf-8")
        third_party = bundle.meta.get("third_party") if isinstance(bundle.meta.get("third_party"), dict) else None
        (tmp / "requirements.txt").write_text(
            requirements_text(source.decode("utf-8"), env, third_party), encoding="utf-8"
        )
        messages = bundle.meta.get("messages")
        has_messages = isinstance(messages, dict) and bool(messages)
        if has_messages:  # not code: the script never reads it
            (tmp / TAG_MESSAGES_FILE).write_text(json.dumps(messages, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        (tmp / "README.md").write_text(readme_text(agg, sub, seeds, command, recipe, has_messages), encoding="utf-8")
    return folder


# --------------------------------------------------------------------------------------------------------------
# pgolf check-folder
# --------------------------------------------------------------------------------------------------------------


def _close(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(float(a), float(b), rel_tol=0.0, abs_tol=FIGURE_ABS_TOLERANCE)
    return a == b


def required_modules(requirements: str) -> set[str]:
    """Modules a requirements.txt accounts for: a requirement line (not a comment) tagged ``# import <module>``,
    or the line :func:`pgolf.report.submission.requirements_text` writes for an optional import (one guarded by
    ``except ImportError``, such as FlashAttention, which has no wheel to list)."""
    modules = set()
    for line in requirements.splitlines():
        optional = line.startswith(OPTIONAL_PREFIX)
        requirement, _, comment = line[len(OPTIONAL_PREFIX):].partition("#") if optional else line.partition("#")
        tag = re.fullmatch(r"\s*import\s+([\w.]+)\s*", comment)
        if requirement.strip() and tag:
            modules.add(tag.group(1))
    return modules


def significance_problems(sub: dict, loss: list[float], bpb: list[float]) -> list[str]:
    """The significance block, the nats delta and the verdict of submission.json against the test recomputed from
    the seed logs' losses and the baseline the block states (``baseline_nats_per_token``), under its own rules
    (unit, threshold, p cutoffs, null hypothesis). A verdict may be lower than the test allows (another blocker
    stopped it), never higher."""
    from pgolf.config import AggregateConfig
    from pgolf.report.aggregate import significance
    from pgolf.report.stats import mean

    sig, problems = sub["significance"], []
    base = sig.get("baseline_nats_per_token")
    nats_per_bpb = mean([l / b for l, b in zip(loss, bpb)])
    if base is None:
        if sig["tested"] or sig["readme_pass"] or sig["progression_pass"]:
            problems.append("significance: a test is claimed, but no baseline_nats_per_token to recompute it from")
        recomputed = {"readme_pass": False, "progression_pass": False}
    elif not math.isclose(sig.get("nats_per_bpb", math.nan), nats_per_bpb, rel_tol=1e-9):
        return [f"significance.nats_per_bpb = {sig.get('nats_per_bpb')!r}, but the seed logs give {nats_per_bpb!r}"]
    else:
        rules = AggregateConfig(unit=sig["unit"], readme_threshold_nats=sig["readme_threshold_nats_per_token"],
                                readme_p=sig["readme_p"], progression_p=sig["progression_p"],
                                readme_null=sig.get("readme_null", "zero"))
        baseline = {"n": base["n"], "nats_per_token": {"mean": base["mean"], "std_sample_ddof1": base["std_sample_ddof1"]}}
        recomputed = significance(loss, bpb, baseline, rules, sig["nats_per_bpb"])
        recomputed_bpb = base["mean"] / sig["nats_per_bpb"]
        if not _close(sub.get("comparison_baseline_bpb"), recomputed_bpb):
            problems.append(f"comparison_baseline_bpb = {sub.get('comparison_baseline_bpb')!r}, but the tested "
                            f"baseline is {recomputed_bpb!r} bpb")
        if not _close(sub.get("delta_vs_leaderboard_nats"), recomputed["delta_nats_per_token"]):
            problems.append(f"delta_vs_leaderboard_nats = {sub.get('delta_vs_leaderboard_nats')!r}, but the seed "
                            f"logs give {recomputed['delta_nats_per_token']!r}")
        for key in ("tested", "p_value", "p_value_vs_threshold", "t", "df", "readme_pass", "progression_pass"):
            if key in recomputed and not _close(sig.get(key), recomputed[key]):
                problems.append(f"significance.{key} = {sig.get(key)!r}, but the seed logs give {recomputed[key]!r}")
    allowed = ("record" if recomputed["readme_pass"] else "progression" if recomputed["progression_pass"]
               else "non-record")
    status = sub["verdict"].get("status")
    if status != allowed and status != "non-record":
        problems.append(f"verdict.status = {status!r}, but the recomputed test allows at most {allowed!r}")
    return problems


def check_folder(folder: str | Path, cap_bytes: int = SIZE_CAP_BYTES) -> list[str]:
    """Every reason the folder is not a valid submission (empty list: it passes)."""
    from pgolf.report.stats import mean, std

    folder = Path(folder)
    if not folder.is_dir():
        return [f"{folder}: not a directory"]
    problems = [
        f"{folder / name}: required file missing" for name in REQUIRED_FOLDER_FILES if not (folder / name).exists()
    ]
    log_paths = {
        int(m.group(1)): p
        for p in folder.glob("train_seed*.log")
        if (m := re.fullmatch(r"train_seed(-?\d+)\.log", p.name))
    }
    if not log_paths:
        problems.append(f"{folder}: no seed logs (train_seed<seed>.log)")

    code = folder / "train_gpt.py"
    code_sha = None
    if code.exists():
        source = code.read_bytes()
        code_sha = sha256_bytes(source)
        try:
            compile(source, str(code), "exec")
        except (SyntaxError, ValueError) as exc:
            problems.append(f"{code}: does not compile: {exc}")
        req = folder / "requirements.txt"
        if req.exists():
            listed = required_modules(req.read_text(encoding="utf-8"))
            for module in third_party_imports(source.decode("utf-8", errors="replace")):
                if module not in listed:
                    problems.append(f"{req}: train_gpt.py imports '{module}', which requirements.txt does not list")

    logs: dict[int, dict] = {}
    for seed, path in sorted(log_paths.items()):
        try:
            logs[seed] = parse_seed_log(path)
        except SubmissionError as exc:
            problems.append(str(exc))
            continue
        if logs[seed].get("seed") != seed:
            problems.append(f"{path}: its summary line is seed {logs[seed].get('seed')!r}'s, not seed {seed}'s")
        problems += log_text_problems(path, logs[seed])
        recorded = logs[seed].get("train_gpt_sha256")
        if code_sha is not None and recorded != code_sha:
            problems.append(
                f"{path}: records train_gpt.py sha256 {str(recorded)[:16]}..., but the folder's "
                f"train_gpt.py has {code_sha[:16]}..."
            )
        artifact = logs[seed].get("artifact_bytes")
        if not isinstance(artifact, int) or artifact > cap_bytes:
            problems.append(f"{path}: artifact {artifact!r} bytes is over the {cap_bytes:,}-byte cap")

    sub_path = folder / "submission.json"
    if not sub_path.exists():
        return problems
    try:
        sub = read_json(sub_path, "submission.json")
    except ValueError as exc:
        return problems + [str(exc)]
    schema_errors = validate(sub, SUBMISSION_SCHEMA)
    problems += [f"{sub_path}: {e}" for e in schema_errors]
    if schema_errors:
        return problems
    prov_sha = sub["provenance"].get("train_gpt_sha256")
    if code_sha is not None and prov_sha is not None and prov_sha != code_sha:
        problems.append(
            f"{sub_path}: provenance.train_gpt_sha256 {prov_sha[:16]}... differs from train_gpt.py ({code_sha[:16]}...)"
        )
    convention = sub["provenance"].get("code_bytes_convention")
    if convention not in CODE_BYTES_CONVENTIONS:
        problems.append(f"{sub_path}: provenance.code_bytes_convention {convention!r}: the code bytes follow no "
                        f"convention pgolf counts ({' or '.join(CODE_BYTES_CONVENTIONS)}), so they cannot be checked")
    elif code_sha is not None and not any("does not compile" in p for p in problems):
        from pgolf.artifact.minify import counted_code_bytes

        counted, _, _ = counted_code_bytes(code, convention)  # the one counter, on the folder's own file
        for seed, result in sorted(sub["seed_results"].items()):
            if result.get("code_bytes") != counted:
                problems.append(
                    f"{sub_path}: seed_results.{seed}.code_bytes = {result.get('code_bytes')!r}, but train_gpt.py "
                    f"counts {counted:,} bytes ({convention})"
                )
    if (folder / "README.md").exists():
        problems += readme_problems(folder / "README.md", sub, logs)
    if sorted(sub["seeds"]) != sorted(log_paths):
        problems.append(f"{sub_path}: seeds {sorted(sub['seeds'])} but the folder has logs for {sorted(log_paths)}")
    if sorted(int(k) for k in sub["seed_results"]) != sorted(sub["seeds"]):
        problems.append(f"{sub_path}: seed_results keys {sorted(sub['seed_results'])} differ from seeds {sub['seeds']}")
    for seed, log in logs.items():
        result = sub["seed_results"].get(str(seed))
        if result is None:
            continue
        for key in ("val_loss", "val_bpb", "artifact_bytes", "model_bytes", "code_bytes", "steps", "step_avg_ms",
                    "eval_time_s"):
            if not _close(result.get(key), log.get(key)):
                problems.append(
                    f"{sub_path}: seed_results.{seed}.{key} = {result.get(key)!r}, but "
                    f"{seed_log_name(seed)} says {log.get(key)!r}"
                )
        if result.get("artifact_bytes") != (result.get("model_bytes") or 0) + (result.get("code_bytes") or 0):
            problems.append(f"{sub_path}: seed_results.{seed}.artifact_bytes is not its model_bytes + code_bytes")
        if result["artifact_bytes"] > cap_bytes:
            problems.append(
                f"{sub_path}: seed {seed} artifact {result['artifact_bytes']:,} bytes "
                f"is over the {cap_bytes:,}-byte cap"
            )
    complete = [logs[s] for s in sub["seeds"] if s in logs]
    if complete and len(complete) == len(sub["seeds"]):
        try:
            bpb = [float(x["val_bpb"]) for x in complete]
            loss = [float(x["val_loss"]) for x in complete]
            sizes = [int(x["artifact_bytes"]) for x in complete]
            code = [int(x["code_bytes"]) for x in complete]
            steps = [float(x["steps"]) for x in complete]
            step_ms = [float(x["step_avg_ms"]) for x in complete]
        except (KeyError, TypeError, ValueError) as exc:
            return problems + [f"{folder}: a seed log summary lacks a figure ({exc})"]
        expected = {
            "val_bpb": mean(bpb),
            "val_loss": mean(loss),
            "val_bpb_std": std(bpb, ddof=1),
            "val_loss_std": std(loss, ddof=1),
            "val_bpb_std_population": std(bpb, ddof=0),
            "val_loss_std_population": std(loss, ddof=0),
            "artifact_bytes_max": max(sizes),
            "artifact_bytes_mean": mean(sizes),
            "bytes_total": max(sizes),
            "bytes_code": max(code),
            "train_steps_mean": mean(steps),
            "step_avg_ms_mean": mean(step_ms),
        }
        if sub.get("comparison_baseline_bpb") is not None:  # the delta against the baseline the file names
            expected["delta_vs_leaderboard_bpb"] = mean(bpb) - float(sub["comparison_baseline_bpb"])
        for key, value in expected.items():
            if not _close(sub.get(key), value):
                problems.append(f"{sub_path}: {key} = {sub.get(key)!r}, but the seed logs give {value!r}")
        problems += [f"{sub_path}: {p}" for p in significance_problems(sub, loss, bpb)]
    if sub["artifact_bytes_max"] > cap_bytes or sub["bytes_total"] > cap_bytes:
        problems.append(
            f"{sub_path}: artifact_bytes_max {sub['artifact_bytes_max']:,} is over the {cap_bytes:,}-byte cap"
        )
    return problems
