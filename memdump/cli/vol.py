"""``memdump vol``: Volatility 3's own command line, with memdump's chunked layer loaded.

``memdump vol -f DUMP.mem.gz PLUGIN [ARGS...]`` is ``vol -f DUMP.mem.gz PLUGIN
[ARGS...]`` except that a chunked ``.mem.gz`` is read in place through its index (only
the chunks a plugin touches are inflated) instead of through Python's gzip module from
the start of the stream. Every argument after ``vol`` goes to Volatility unchanged
(``memdump vol -h`` is Volatility's help); an older single-stream dump, or any other
image, opens as it would with ``vol``.
"""

from __future__ import annotations

import argparse

from memdump.settings import Settings


def cmd_vol(settings: Settings, args: argparse.Namespace) -> int:
    from memdump import volatility

    return volatility.run_cli(list(args.vol_args))


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "vol",
        help="run Volatility 3 (vol) on a dump; a chunked .mem.gz is read in place",
        description=__doc__,
        # Nothing here is ours: every argument, -h and -f included, is Volatility's.
        add_help=False,
        prefix_chars="\0",
    )
    p.add_argument("vol_args", nargs=argparse.REMAINDER, help="vol's arguments")
    p.set_defaults(handler=cmd_vol)
