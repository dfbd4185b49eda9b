"""
Content scanning with rspamd (``/checkv2``) at the end of DATA.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from typing import Any

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.client import FileBodyProducer, readBody
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent

from relayx.address import Mailbox
from relayx.checks.chain import AddHeaders, Client, Filter, Verdict
from relayx.reply import Reply

log = Logger()


#: rspamd's actions (https://rspamd.com/doc/configuration/metrics.html)
RSPAMD_REPLIES = {
    "reject": Reply(554, "5.7.1", "Message rejected as spam"),
    "soft reject": Reply(451, "4.7.1", "Message deferred, try again later"),
    "greylist": Reply(451, "4.7.1", "Message deferred, try again later"),
}
RSPAMD_UNAVAILABLE = Reply(451, "4.7.1", "Content scanner unavailable, try again later")


@attrs.define
class Rspamd(Filter):
    """
    The whole message scanned by rspamd (``POST /checkv2``) at the end of
    DATA; its action decides: reject (554), soft reject or greylist (451),
    add header or rewrite subject (``X-Spam: Yes``), else accept. The score
    is recorded in ``X-Rspamd-Score``. When rspamd does not answer within
    ``timeout``, the message passes (``fail_open``) or is deferred with 451.
    """

    url: str
    timeout: float
    fail_open: bool
    clock: IReactorTime
    agent: IAgent
    hostname: str
    name = "rspamd"

    async def message(self, client: Client, sender: str, recipients: Sequence[Mailbox], content: bytes) -> Verdict:
        try:
            answer = await self._scan(client, sender, recipients, content)
        except Exception as e:
            if self.fail_open:
                raise
            log.warn("rspamd did not answer ({why}); message deferred", why=repr(e), code=451)
            return RSPAMD_UNAVAILABLE
        action = str(answer.get("action", "no action"))
        score = f"X-Rspamd-Score: {float(answer.get('score', 0)):.2f} / {float(answer.get('required_score', 0)):.2f}"
        reply = RSPAMD_REPLIES.get(action)
        if reply is not None:
            log.info(
                "rspamd: {action} for mail from {client} ({score})",
                action=action,
                client=client.ip,
                score=answer.get("score"),
                code=reply.code,
            )
            return reply
        if action in ("add header", "rewrite subject"):
            return AddHeaders(("X-Spam: Yes", score))
        return AddHeaders((score,))

    async def _scan(self, client: Client, sender: str, recipients: Sequence[Mailbox], content: bytes) -> dict[str, Any]:
        headers = Headers(
            {
                b"IP": [client.ip.encode()],
                b"Helo": [client.helo.encode()],
                b"From": [sender.encode() or b"<>"],
                b"Rcpt": [str(r).encode() for r in recipients],
                b"MTA-Name": [self.hostname.encode()],
                b"Content-Type": [b"message/rfc822"],
            }
        )
        started = self.clock.seconds()
        request: Deferred[Any] = self.agent.request(
            b"POST", self.url.rstrip("/").encode() + b"/checkv2", headers, FileBodyProducer(io.BytesIO(content))
        )
        request.addTimeout(self.timeout, self.clock)
        response = await request
        remaining = max(0.1, self.timeout - (self.clock.seconds() - started))
        body: Deferred[bytes] = readBody(response)
        body.addTimeout(remaining, self.clock)
        data = await body
        if response.code != 200:
            raise RuntimeError(f"rspamd answered HTTP {response.code}")
        answer = json.loads(data)
        if not isinstance(answer, dict):
            raise RuntimeError("rspamd's answer is not a JSON object")
        return answer
