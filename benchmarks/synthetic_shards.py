"""Write synthetic train/val shards (random tokens, BOS every ~lognormal document length) for speed benchmarks.

Speed does not depend on the token values, only on shapes and document lengths; FineWeb documents average
about a thousand tokens with a long tail, which the lognormal below imitates.

    python benchmarks/synthetic_shards.py --out DIR --vocab 8192 --train-tokens 200000000 --val-tokens 2000000
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from pgolf.data.shards import BOS_ID, shard_name, write_shard


def synthetic_stream(num_tokens: int, vocab: int, rng: np.random.Generator, mean_log_len: float = 6.5) -> np.ndarray:
    tokens = rng.integers(8, vocab, size=num_tokens, dtype=np.uint16)
    position = 0
    while position < num_tokens:
        tokens[position] = BOS_ID
        position += max(int(rng.lognormal(mean_log_len, 1.0)), 2)
    return tokens


# the shards shared/reference/side_by_side.sh writes for the record script (and the benches compared with it read)
HARNESS_TRAIN_TOKENS, HARNESS_VAL_TOKENS = 120_000_000, 1_000_000


def write_shards(out: Path, vocab: int, train_tokens: int, val_tokens: int, shard_tokens: int = 100_000_000,
                 seed: int = 0) -> int:
    """Write one val shard (+ its byte sidecar) and the train shards to ``out``; returns the train shard count."""
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    val = synthetic_stream(val_tokens, vocab, rng)
    write_shard(out / shard_name("val", 0), val)
    write_shard(out / shard_name("val_bytes", 0), np.where(val == BOS_ID, 0, 3).astype(np.uint16))
    remaining, index = train_tokens, 0
    while remaining > 0:
        n = min(remaining, shard_tokens)
        write_shard(out / shard_name("train", index), synthetic_stream(n, vocab, rng))
        remaining -= n
        index += 1
    return index


def ensure_harness_shards(out: Path, vocab: int = 8192) -> None:
    """The record harness's shards in ``out``, written unless a val shard is already there."""
    if not (out / shard_name("val", 0)).is_file():
        write_shards(out, vocab, HARNESS_TRAIN_TOKENS, HARNESS_VAL_TOKENS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--train-tokens", type=int, default=200_000_000)
    parser.add_argument("--val-tokens", type=int, default=2_000_000)
    parser.add_argument("--shard-tokens", type=int, default=100_000_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    count = write_shards(Path(args.out), args.vocab, args.train_tokens, args.val_tokens, args.shard_tokens, args.seed)
    print(f"wrote {count} train shards and 1 val shard to {args.out}")


if __name__ == "__main__":
    main()
