"""`python -m scheduler`: the same as `pagedserve scheduler`."""

import sys

from shared.cli import main

sys.exit(main(["scheduler", *sys.argv[1:]]))
