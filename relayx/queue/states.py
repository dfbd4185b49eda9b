"""
The states of a delivery job, defined once in Lua (``job_state`` and
``held_at`` in ``common.lua``) and mirrored here for Python readers: the
metrics, the admin API and the command-line views name states only through
``JobState``.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping


class JobState(enum.StrEnum):
    """
    Where a job is: waiting its turn, held by an operator, waiting for a
    retry, being delivered under a lease, or failed and waiting for its DSN.
    """

    READY = "ready"
    HELD = "held"
    DEFERRED = "deferred"
    IN_FLIGHT = "in_flight"
    FAILED = "failed"


def held_at(domain_fields: Mapping[str, str], now_ms: float) -> bool:
    """
    Whether a domain is held at ``now_ms``, from its state hash: the Python
    mirror of ``held_at`` in ``common.lua``.
    """
    start = float(domain_fields.get("hold_start", 0) or 0)
    stop = float(domain_fields.get("hold_end", 0) or 0)
    if 0 < stop <= now_ms:
        return False
    return domain_fields.get("held") == "1" or 0 < start <= now_ms
