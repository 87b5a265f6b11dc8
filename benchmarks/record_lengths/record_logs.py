"""Parse the record's (PR #1855) 8xH100 logs: per-batch document-length ranges, rank-0 batch sequences with their
running losses, phase pauses/resumes, phase-SGD chunk counts and the total evaluation time.

Only the standard library. Used by doc_lengths.py (length reconstruction) and replay.py (schedule replay).
"""
from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

# the record folder: PR1855_DIR, or shared/reference/pr1855 beside the repository
REF = Path(os.environ.get("PR1855_DIR", Path(__file__).resolve().parents[3] / "shared" / "reference" / "pr1855"))
SEEDS = (42, 0, 1234)

NUM_DOCS = 50_000
BATCH = 64
NUM_BATCHES = 782  # ceil(50000 / 64); the last (longest-document) batch holds 50000 - 781*64 = 16 documents
TARGETS = 47_851_520  # data.md / log "val_tokens:" = val_tokens.numel() - 1 = sum over docs of (dl - 1)
SUM_DL = TARGETS + NUM_DOCS  # sum of the record's doc_len (own tokens + the next BOS, except the stream's last doc)

_TTP = re.compile(r"^ttp: b(\d+)/(\d+) bl:([\d.]+) bb:([\d.]+) rl:([\d.]+) rb:([\d.]+) dl:(\d+)-(\d+) gd:(\d)")
_TTPP = re.compile(r"^ttpp: phase:(\d)/(\d) pd:(\d+) gd:(\d+) t:([\d.]+)s")
_TTPR = re.compile(r"^ttpr: phase:(\d)/(\d) t:([\d.]+)s")
_TTTG = re.compile(r"^tttg: c(\d+)/(\d+) lr:([\d.]+) t:([\d.]+)s")
_TOTAL = re.compile(r"^total_eval_time:([\d.]+)s")
_WARM = re.compile(r"^ttt_lora:compile warmup done \(([\d.]+)s\)")
_DESER = re.compile(r"^Deserialize: decompression done in ([\d.]+)s")


@dataclasses.dataclass
class TtpLine:
    batch: int  # 1-based index in the ascending sort (the record's orig_batch_idx + 1)
    bl: float
    bb: float
    rl: float
    rb: float
    dl_min: int
    dl_max: int
    gd: int
    segment: int  # 0..3: how many phases had run when this line was written


@dataclasses.dataclass
class SeedLog:
    seed: int
    ttp: list  # rank 0's batches in the order it finished them
    pauses: list  # (phase, pd, gd, t)
    resumes: list  # (phase, t)
    phase_chunks: list  # num_chunks of each phase SGD (the logged c/N denominator)
    phase_chunk_times: list  # per phase: list of (ci, t since the phase started)
    total_eval_s: float
    compile_warmup_s: float
    deserialize_s: list


def parse(seed: int) -> SeedLog:
    ttp, pauses, resumes, chunks, ctimes, deser = [], [], [], [], [], []
    total = warm = None
    seg = 0
    for line in (REF / f"train_seed{seed}.log").read_text().splitlines():
        if m := _TTP.match(line):
            b, n = int(m[1]), int(m[2])
            assert n == NUM_BATCHES
            ttp.append(TtpLine(b, float(m[3]), float(m[4]), float(m[5]), float(m[6]), int(m[7]), int(m[8]), int(m[9]), seg))
        elif m := _TTPP.match(line):
            pauses.append((int(m[1]), int(m[3]), int(m[4]), float(m[5])))
            ctimes.append([])
        elif m := _TTPR.match(line):
            resumes.append((int(m[1]), float(m[3])))
            seg += 1
        elif m := _TTTG.match(line):
            ctimes[-1].append((int(m[1]), float(m[4])))
            if len(chunks) < len(ctimes):
                chunks.append(int(m[2]))
        elif m := _TOTAL.match(line):
            total = float(m[1])
        elif m := _WARM.match(line):
            warm = float(m[1])
        elif m := _DESER.match(line):
            deser.append(float(m[1]))
    return SeedLog(seed, ttp, pauses, resumes, chunks, ctimes, total, warm, deser)


def all_logs() -> dict:
    return {s: parse(s) for s in SEEDS}


def batch_ranges(logs: dict) -> dict:
    """batch (1-based) -> (min dl, max dl), the union over the seeds (checked consistent)."""
    out: dict = {}
    for log in logs.values():
        for t in log.ttp:
            prev = out.setdefault(t.batch, (t.dl_min, t.dl_max))
            assert prev == (t.dl_min, t.dl_max), (t.batch, prev, (t.dl_min, t.dl_max))
    return dict(sorted(out.items()))


if __name__ == "__main__":
    logs = all_logs()
    r = batch_ranges(logs)
    print(f"{len(r)} batches with a logged range; first {list(r.items())[:3]}, last {list(r.items())[-3:]}")
    for s, log in logs.items():
        print(s, "pauses", log.pauses, "resumes", log.resumes, "chunks", log.phase_chunks, "total", log.total_eval_s,
              "warm-up", log.compile_warmup_s, "rank-0 batches", len(log.ttp))
