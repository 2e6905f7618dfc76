"""`python -m worker`: the same as `pagedserve worker`."""

import sys

from shared.cli import main

sys.exit(main(["worker", *sys.argv[1:]]))
