"""
``relayx --config FILE``: run one node in the foreground (``twistd -n relayx``);
``relayx nodes|status|hold|release ... --config FILE``: operate the queue.

The options are checked here first, so a bad configuration ends with one
line naming the file, the key and what was expected, not twistd's usage text.
"""

from __future__ import annotations

import sys

from twisted.python import usage


def main(argv: list[str] | None = None) -> None:
    from twisted.scripts.twistd import run

    from relayx.tap import Options

    args = sys.argv[1:] if argv is None else argv
    from relayx.ops import cli as admin

    if args and args[0] in admin.COMMANDS:
        admin.main(args[0], args[1:])
        return
    logger: list[str] = []
    if not any(a in ("-h", "--help") for a in args):
        options = Options()
        try:
            options.parseOptions(args)
        except usage.UsageError as e:
            print(f"relayx: {e}", file=sys.stderr)
            raise SystemExit(2) from None
        if options.loaded is not None and options.loaded.node.log_format == "json":
            logger = ["--logger=relayx.logs.json_logger"]
    sys.argv = ["twistd", "--nodaemon", "--pidfile=", *logger, "relayx", *args]
    run()
    from relayx.tap import NODES

    if any(node.failed_to_start for node in NODES):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
