"""`python -m launcher ...` is `pagedserve ...`."""

import sys

from launcher.cli import main

sys.exit(main())
