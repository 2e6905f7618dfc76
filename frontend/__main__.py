"""`python -m frontend`: the same as `pagedserve frontend`."""

import sys

from shared.cli import main

sys.exit(main(["frontend", *sys.argv[1:]]))
