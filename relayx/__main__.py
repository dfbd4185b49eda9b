"""
``relayx --config FILE``: run one node in the foreground (``twistd -n relayx``);
``relayx VERB ...`` and ``relayctl VERB ...``: operate the cluster (``relayx.ops.cli``).

The options are checked here first, so a bad configuration ends with one
line naming the file, the key and what was expected, not twistd's usage text.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Any

from twisted.python import usage

from relayx.ops.cli import VERBS


def main(argv: list[str] | None = None) -> None:
    from twisted.scripts.twistd import run

    from relayx.tap import Options

    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help") or args[0] in VERBS or _verb_after_options(args):
        raise SystemExit(operate(args, "relayx"))
    if args and args[0] == "worker":
        run_worker(args[1:])
        return
    logger: list[str] = []
    if not any(a in ("-h", "--help") for a in args):
        options = Options()
        try:
            options.parseOptions(args)
        except usage.UsageError as e:
            print(f"relayx: {e}", file=sys.stderr)
            raise SystemExit(2) from None
        if options.loaded is not None:
            kind = "json" if options.loaded.node.log_format == "json" else "text"
            logger = [f"--logger=relayx.logs.{kind}_logger"]
        if options.loaded is not None and options.loaded.node.processes > 1:
            _shared_metrics(options.loaded.node.data_dir)
            args = ["--supervise", *args]
    sys.argv = ["twistd", "--nodaemon", "--pidfile=", *logger, "relayx", *args]
    run()
    from relayx.tap import NODES

    if any(node.failed_to_start for node in NODES):
        raise SystemExit(1)


def operate(args: list[str], program: str) -> int:
    """
    One operator verb (``relayx.ops.cli``), which for ``--config`` opens the
    admin API over the cluster's Redis and body store without a node.
    """
    from relayx.ops import cli

    async def open_local(config: Any, reactor: Any) -> Any:
        # the node's wiring (and its body store's libraries) only when --config asks for it
        from relayx.service import operator_api

        return await operator_api(config, reactor)

    return cli.main(args, program=program, open_local=open_local)


def _verb_after_options(args: list[str]) -> bool:
    """
    Whether a verb follows the operator's own options (``relayx --json
    --config FILE status``); a node's ``--config FILE`` alone is no verb.
    """
    rest = list(args)
    while rest and rest[0] in ("--json", "--config", "--url", "--token", "--token-file"):
        name = rest.pop(0)
        if name != "--json" and rest:
            rest.pop(0)
    return bool(rest) and rest[0] in VERBS


def relayctl() -> None:
    """
    ``relayctl VERB``: the same verbs, over a node's admin API unless given ``--config``.
    """
    raise SystemExit(operate(sys.argv[1:], "relayctl"))


def _shared_metrics(data_dir: Path) -> None:
    """
    Metrics added up over the node's processes: prometheus_client's
    multi-process mode, in a fresh folder of the data directory.
    """
    folder = data_dir / "metrics"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True, mode=0o700)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(folder)


def run_worker(argv: list[str]) -> None:
    """
    ``relayx worker --index N --config FILE --smtp-listen ...``: one SMTP
    worker of a node, started by the node's first process (not by hand).
    """
    from twisted.internet.defer import Deferred
    from twisted.internet.task import react
    from twisted.logger import globalLogBeginner, textFileLogObserver

    from relayx.logs import json_logger
    from relayx.service import NodeRole, RelayNode, StartupError
    from relayx.tap import Options
    from relayx.workers import watch_parent

    if len(argv) < 2 or argv[0] != "--index" or not argv[1].isdigit():
        print("relayx worker: started by the node itself (relayx --config FILE)", file=sys.stderr)
        raise SystemExit(2)
    index = int(argv[1])
    options = Options()
    try:
        options.parseOptions(argv[2:])
    except usage.UsageError as e:
        print(f"relayx worker {index}: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    config = options.loaded
    assert config is not None
    observer = json_logger() if config.node.log_format == "json" else textFileLogObserver(sys.stdout)
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)

    async def run(reactor: Any) -> None:
        node = RelayNode(config, reactor, role=NodeRole.SMTP_WORKER, freeze_startup=True)
        gone: Deferred[None] = Deferred()
        try:
            await node.start()
        except StartupError as e:
            print(f"relayx worker {index}: {e}", file=sys.stderr)
            raise SystemExit(1) from None
        reactor.addSystemEventTrigger("before", "shutdown", lambda: Deferred.fromCoroutine(node.stop()))

        def parent_gone() -> None:
            if not gone.called:
                gone.callback(None)

        watch_parent(reactor, parent_gone)
        await gone

    react(lambda reactor: Deferred.fromCoroutine(run(reactor)))


if __name__ == "__main__":
    main()
