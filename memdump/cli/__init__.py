"""The ``memdump`` command line, one module per command group:

- ``app``: the parser and dispatch (commands register themselves; commands of the layers
  above the engine, such as ``serve``, come from the ``memdump.commands`` entry-point group)
- ``inventory`` (vms), ``capture``, ``maintenance`` (clean, verify, diff): the engine, no server
- ``trigger``, ``queries`` (status, records, stats): a running service over its REST API,
  through ``client`` (the one HTTP client) and ``render`` (the one renderer)
- ``vol``: Volatility 3's own command line with memdump's chunked layer loaded
"""

from memdump.cli.app import main, run

__all__ = ["main", "run"]
