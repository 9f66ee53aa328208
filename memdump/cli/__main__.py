"""``python -m memdump.cli``: the ``memdump`` console script."""

import sys

from memdump.cli.app import main

sys.exit(main())
