"""
``relayx --config FILE``: run one node in the foreground (``twistd -n relayx``).
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    from twisted.scripts.twistd import run

    args = sys.argv[1:] if argv is None else argv
    sys.argv = ["twistd", "--nodaemon", "--pidfile=", "relayx", *args]
    run()


if __name__ == "__main__":
    main()
