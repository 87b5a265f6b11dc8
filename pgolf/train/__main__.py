"""``python -m pgolf.train ARGS``: the training stage under torchrun, the same as ``pgolf train ARGS``."""

import sys

from pgolf.cli import main

sys.exit(main(["train", *sys.argv[1:]], modules=("pgolf.train.cli",)))
