"""``python -m pgolf.bench train|eval ARGS`` = ``pgolf bench train|eval ARGS``.

Kept at this name because the record-versus-pgolf timing script of the shared reference
(``shared/reference/side_by_side.sh``) calls ``python3 -m pgolf.bench train``; it loads only the two benchmark
command modules, so it runs where other commands' dependencies (brotli, snakemake) are missing.
"""

import sys

from pgolf.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]], modules=("pgolf.train.cli", "pgolf.evaluate.cli")))
