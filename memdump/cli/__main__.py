"""``python -m memdump.cli``: the ``memdump`` console script."""

from memdump.cli.app import run

run()
