"""
The web control panel: one page of plain HTML and JavaScript, served by the
admin listener at ``/``, that talks to the admin API with the operator's
bearer token (kept in the browser tab's session storage, never in a cookie,
so no other site can make the browser act with it).
"""

from __future__ import annotations

from importlib.resources import files

from twisted.web.resource import Resource
from twisted.web.server import Request

PAGE = files(__package__).joinpath("index.html").read_bytes()


class Panel(Resource):
    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"x-frame-options", b"DENY")
        request.setHeader(
            b"content-security-policy",
            b"default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; frame-ancestors 'none'",
        )
        return PAGE
