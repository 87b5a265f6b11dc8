"""``python -m pgolf.evaluate ARGS``: the evaluation stage under torchrun, the same as ``pgolf evaluate ARGS``."""

import sys

from pgolf.cli import main

sys.exit(main(["evaluate", *sys.argv[1:]], modules=("pgolf.evaluate.cli",)))
