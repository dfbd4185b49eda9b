"""
``twistd relayx``: command-line options and the service they make.
"""

from __future__ import annotations

from typing import Any, ClassVar

from twisted.application.service import IService
from twisted.python import usage

from relayx.config import Config, ConfigError, load


class Options(usage.Options):
    """
    Options for ``twistd relayx``; those given override the TOML file.
    """

    optFlags: ClassVar[list[list[str | None]]] = [
        ["supervise", None, "Start [node] processes - 1 more SMTP processes on the same ports (relayx does)."],
    ]
    optParameters: ClassVar[list[list[str | None]]] = [
        ["config", "c", None, "Path of the TOML configuration file (required)."],
        ["redis-url", None, None, "Redis URL (redis://host:port/db); overrides [redis] url."],
        ["node-id", None, None, "This node's id; overrides [node] id."],
        ["data-dir", None, None, "Data directory; overrides [node] data_dir."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["smtp-listen"] = []
        self.loaded: Config | None = None

    def opt_smtp_listen(self, endpoint: str) -> None:
        """
        Twisted endpoint string to accept SMTP on (repeatable); overrides [smtp] listen.
        """
        self["smtp-listen"].append(endpoint)

    def worker_args(self) -> list[str]:
        """
        The overrides given here, for the node's SMTP workers to load the
        same configuration (their ports are given apart).
        """
        args = []
        for name in ("redis-url", "node-id", "data-dir"):
            if self[name]:
                args += [f"--{name}", self[name]]
        return args

    def postOptions(self) -> None:
        if not self["config"]:
            raise usage.UsageError("--config is required")
        overrides: dict[str, Any] = {}
        if self["smtp-listen"]:
            overrides["smtp.listen"] = list(self["smtp-listen"])
        if self["redis-url"]:
            overrides["redis.url"] = self["redis-url"]
        if self["node-id"]:
            overrides["node.id"] = self["node-id"]
        if self["data-dir"]:
            overrides["node.data_dir"] = self["data-dir"]
        try:
            self.loaded = load(self["config"], overrides)
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    from relayx.service import RelayNode

    assert options.loaded is not None
    node = RelayNode(
        options.loaded,
        reactor,
        worker_args=options.worker_args() if options["supervise"] else None,
        freeze_startup=True,
    )
    NODES.append(node)
    return node


#: the nodes made in this process, for ``relayx`` to report a failed start-up
NODES: list[Any] = []
