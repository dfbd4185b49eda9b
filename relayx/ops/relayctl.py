"""
``relayctl``: the operator's verbs over a node's admin API. One program with
``relayx VERB`` (see ``relayx.ops.cli``, which holds every verb); this name
stays for imports written before the two were one.
"""

from __future__ import annotations

import sys
from typing import TextIO

from relayx.ops.cli import Client, Failure, table, watch, watch_bulk
from relayx.ops.cli import main as _main


def main(argv: list[str] | None = None, out: TextIO | None = None) -> int:
    return _main(argv, out, program="relayctl")


__all__ = ["Client", "Failure", "main", "table", "watch", "watch_bulk"]

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
