"""
A private Postfix instance (Debian's ``postfix`` package) on a loopback
port, for interoperability tests: its own configuration, queue and maildir
under a temporary directory, started as ``master -d`` and stopped by its
pid. It needs root (Postfix's master drops privileges to ``postfix``);
without it or the package, the tests that use it are skipped with the reason.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from unittest import SkipTest

from relayx.redis.embedded import free_port

DAEMONS = Path("/usr/lib/postfix/sbin")

MAIN_CF = """\
compatibility_level = 3.6
queue_directory = {root}/spool
data_directory = {root}/data
command_directory = /usr/sbin
daemon_directory = {daemons}
meta_directory = /etc/postfix
shlib_directory = no
mail_owner = postfix
setgid_group = postdrop
myhostname = primary.example.com
mydomain = example.com
mydestination =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
maillog_file = {root}/maillog
maillog_file_prefixes = {root}
alias_maps =
alias_database =
biff = no
smtputf8_enable = yes
# no header rewriting or added headers: what arrives is compared byte for byte
local_header_rewrite_clients =
# the primary: {domain} delivered to a maildir
virtual_mailbox_domains = {domain}
virtual_mailbox_base = {root}/mail
virtual_mailbox_maps = static:box/
virtual_uid_maps = static:{uid}
virtual_gid_maps = static:{gid}
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject
# the sender: everything else goes to relayx
relayhost = {relayhost}
smtp_tls_security_level = none
smtp_address_preference = ipv4
smtp_host_lookup = native
queue_run_delay = 1s
minimal_backoff_time = 1s
maximal_backoff_time = 2s
"""


def find_postfix() -> Path | None:
    master = DAEMONS / "master"
    if not master.exists() or shutil.which("postconf") is None:
        return None
    return master


class PostfixProcess:
    """
    Postfix as the primary of ``domain`` (maildir under ``mail``) and as a
    sender relaying every other domain to ``relayhost`` (``[127.0.0.1]:port``).
    """

    def __init__(self, domain: str = "example.com") -> None:
        master = find_postfix()
        if master is None:
            raise SkipTest("Postfix is not installed (Debian package postfix)")
        if os.geteuid() != 0:
            raise SkipTest("a private Postfix instance needs root (its master drops to the postfix user)")
        try:
            owner = pwd.getpwnam("postfix")
        except KeyError:
            raise SkipTest("no postfix user") from None
        self.master = master
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="relayx-postfix-"))
        os.chmod(self.root, 0o755)
        self.etc = self.root / "etc"
        self.etc.mkdir()
        self.domain = domain
        self.owner = owner
        (self.etc / "master.cf").write_text(self._master_cf())
        for name in ("data", "mail"):
            (self.root / name).mkdir()
            os.chown(self.root / name, owner.pw_uid, owner.pw_gid)
        self.process: subprocess.Popen[bytes] | None = None

    def _master_cf(self) -> str:
        """
        Debian's master.cf without chroot, smtpd on the private port only.
        """
        lines = []
        for line in Path("/etc/postfix/master.cf").read_text().splitlines():
            fields = line.split()
            if line[:1].isalnum() and len(fields) >= 8:
                fields[4] = "n"
                if fields[0] == "smtp" and fields[1] == "inet":
                    fields[0] = f"127.0.0.1:{self.port}"
                line = " ".join(fields)
            lines.append(line)
        return "\n".join(lines) + "\n"

    def start(self, relayhost: str = "", within: float = 20.0) -> None:
        (self.etc / "main.cf").write_text(
            MAIN_CF.format(
                root=self.root,
                daemons=DAEMONS,
                domain=self.domain,
                uid=self.owner.pw_uid,
                gid=self.owner.pw_gid,
                relayhost=relayhost,
            )
        )
        parameters = [
            f"config_directory={self.etc}",
            "meta_directory=/etc/postfix",
            f"queue_directory={self.root / 'spool'}",
            f"daemon_directory={DAEMONS}",
            "command_directory=/usr/sbin",
            f"data_directory={self.root / 'data'}",
            "mail_owner=postfix",
            "setgid_group=postdrop",
        ]
        environment = {**os.environ, "MAIL_CONFIG": str(self.etc)}
        subprocess.run(
            [str(DAEMONS / "post-install"), *parameters, "create-missing"],
            env=environment,
            check=True,
            capture_output=True,
        )
        self.process = subprocess.Popen(
            [str(self.master), "-c", str(self.etc), "-d"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Postfix master exited: {self.process.stderr.read()!r}")  # type: ignore[union-attr]
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"Postfix did not listen on {self.port} within {within}s")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)  # master ends its children
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
        shutil.rmtree(self.root, ignore_errors=True)

    def delivered(self) -> list[bytes]:
        """
        The messages in the maildir, oldest first, as Postfix wrote them (LF line ends).
        """
        new = self.root / "mail" / "box" / "new"
        if not new.exists():
            return []
        return [p.read_bytes() for p in sorted(new.iterdir(), key=lambda p: p.stat().st_mtime_ns)]

    def log(self) -> str:
        path = self.root / "maillog"
        return path.read_text(errors="replace") if path.exists() else ""
