"""
Test doubles for what cannot be observed otherwise; each is checked with
``verifyObject`` and passes the same contract tests as the real thing.
"""

from __future__ import annotations

from zope.interface import implementer

from relayx.interfaces import IMessageStore, IncomingMessage, StoreUnavailable


@implementer(IMessageStore)
class MemoryStore:
    """
    Keeps committed messages in a list; ``unavailable`` makes every
    commit fail as a Redis outage would.
    """

    def __init__(self) -> None:
        self.messages: list[IncomingMessage] = []
        self.unavailable = False

    async def enqueue(self, message: IncomingMessage) -> None:
        if self.unavailable:
            raise StoreUnavailable("store switched off by the test")
        if any(m.queue_id == message.queue_id for m in self.messages):
            raise StoreUnavailable(f"duplicate queue id {message.queue_id}")
        self.messages.append(message)
