import sys

from pgolf.cli import main

sys.exit(main())
