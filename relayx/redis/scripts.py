"""
Lua scripts, loaded from the package beside the code that runs them and sent
to Redis by their SHA1 (``EVALSHA``), with the source as the fallback.
"""

from __future__ import annotations

import functools
import hashlib
from importlib.resources import files

import attrs


@attrs.frozen
class Script:
    source: bytes = attrs.field(repr=False)
    sha: str


@functools.cache
def load_script(package: str, name: str, prelude: bool = False) -> Script:
    """
    The script ``name`` of ``package``; with ``prelude``, after the shared
    helpers of that package's ``common.lua``. Loaded once, sent by hash.
    """
    folder = files(package)
    source = folder.joinpath(name).read_bytes()
    if prelude:
        source = folder.joinpath("common.lua").read_bytes() + b"\n" + source
    return Script(source, hashlib.sha1(source).hexdigest())
