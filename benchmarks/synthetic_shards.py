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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--train-tokens", type=int, default=200_000_000)
    parser.add_argument("--val-tokens", type=int, default=2_000_000)
    parser.add_argument("--shard-tokens", type=int, default=100_000_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    val = synthetic_stream(args.val_tokens, args.vocab, rng)
    write_shard(out / shard_name("val", 0), val)
    write_shard(out / shard_name("val_bytes", 0), np.where(val == BOS_ID, 0, 3).astype(np.uint16))
    remaining, index = args.train_tokens, 0
    while remaining > 0:
        n = min(remaining, args.shard_tokens)
        write_shard(out / shard_name("train", index), synthetic_stream(n, args.vocab, rng))
        remaining -= n
        index += 1
    print(f"wrote {index} train shards and 1 val shard to {out}")


if __name__ == "__main__":
    main()
