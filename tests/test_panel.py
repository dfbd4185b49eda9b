"""
The control panel end to end in a real browser: headless Chromium (Debian's,
``.ci/run`` installs it) driven by Playwright against a node on loopback.
"""

from __future__ import annotations

import os
import smtplib
import time
from unittest import SkipTest

from twisted.internet.threads import deferToThread

from relayx.redis.embedded import free_port
from tests.helpers import LoopbackSink, NodeCase
from tests.test_queue_redis import deferred_test

CHROMIUM = "/usr/bin/chromium"
TOKEN = "panel-token-0123456789abcdef"
# the flags a closed network needs: no background calls to Google's hosts
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def browse(admin_port: int, smtp_port: int, sink: LoopbackSink) -> None:
    """
    The operator's walk through the panel, in the test's worker thread
    (Playwright's synchronous API blocks).
    """
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            page = browser.new_page()
            page.set_default_timeout(20_000)
            page.goto(f"http://127.0.0.1:{admin_port}/")
            page.fill("#token", "wrong-token-0123456789")
            page.click("#login")
            expect(page.locator("#login-error")).to_contain_text("a valid bearer token is required")
            page.fill("#token", TOKEN)
            page.click("#login")
            page.click("#domains tr[data-domain='example.com'] a")
            expect(page.locator("#domain-name")).to_have_text("example.com")
            page.click("#hold")
            expect(page.locator("#domain-name")).to_have_text("example.com (held)")

            with smtplib.SMTP("127.0.0.1", smtp_port, timeout=30) as client:
                client.sendmail("bob@sender.test", ["carol@example.com"], b"Subject: panel test\r\n\r\nheld\r\n")
            held = page.locator("#messages tr[data-state='held']")
            expect(held).to_have_count(1)
            expect(held).to_contain_text("carol@example.com")

            held.locator("a").click()
            expect(page.locator("#message-header")).to_contain_text("Subject: panel test")
            expect(page.locator("#jobs tr[data-state='held']")).to_have_count(1)
            page.go_back()

            page.click("#release")
            expect(page.locator("#domain-name")).to_have_text("example.com")
            expect(page.locator("#messages tbody tr")).to_have_count(0)
            deadline = time.monotonic() + 20
            while not sink.messages and time.monotonic() < deadline:
                time.sleep(0.05)
            assert [m.recipients for m in sink.messages] == [["carol@example.com"]]
        finally:
            browser.close()


class PanelTests(NodeCase):
    @deferred_test
    async def test_hold_see_release_in_browser(self) -> None:
        """When an operator signs in with the token and holds a domain, a new message shows as held, and after
        release it is delivered and leaves the list."""
        if not os.path.exists(CHROMIUM):
            raise SkipTest(f"{CHROMIUM} is not installed (apt-get install chromium); the panel test needs it")
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError:
            raise SkipTest("playwright is not installed (pip install '.[test]')") from None
        sink = LoopbackSink()
        sink.start()
        admin_port = free_port()
        await self.start_node(sink, admin_listen=[f"tcp:{admin_port}:interface=127.0.0.1"], admin_tokens={"ops": TOKEN})
        await deferToThread(browse, admin_port, self.smtp_port, sink)
