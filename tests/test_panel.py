"""
The control panel end to end in a real browser: headless Chromium (Debian's,
``.ci/run`` installs it) driven by Playwright against a node on loopback.
"""

from __future__ import annotations

import os
import smtplib
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import cast
from unittest import SkipTest

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.threads import blockingCallFromThread, deferToThread

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


def browse(admin_port: int, smtp_port: int, sink: LoopbackSink, sample: Callable[[float], bool], shots: Path) -> None:
    """
    The operator's walk through the panel, in the test's worker thread
    (Playwright's synchronous API blocks); ``sample`` records the history at
    a given time in the reactor's thread; screenshots go to ``shots``.
    """
    from playwright.sync_api import Dialog, expect, sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.set_default_timeout(20_000)
            page.goto(f"http://127.0.0.1:{admin_port}/")
            page.fill("#token", "wrong-token-0123456789")
            page.click("#login")
            expect(page.locator("#login-error")).to_contain_text("a valid bearer token is required")
            page.screenshot(path=str(shots / "0-sign-in.png"))
            page.fill("#token", TOKEN)
            page.click("#login")
            expect(page.locator("#sign-out")).to_be_visible()
            expect(page.locator("#chart-cluster-depth")).to_contain_text("No samples in this window yet")
            page.click("#domains tr[data-domain='example.com'] a")
            expect(page.locator("#domain-name")).to_have_text("example.com")

            # a scheduled hold: saved, shown, then edited
            tomorrow = datetime.now() + timedelta(days=1)
            page.fill("#hold-from", tomorrow.strftime("%Y-%m-%dT09:00"))
            page.fill("#hold-until", tomorrow.strftime("%Y-%m-%dT11:00"))
            page.click("#schedule")
            day = tomorrow.strftime("%Y-%m-%d")
            expect(page.locator("#action-result")).to_have_text(
                f"example.com will be held from {day} 09:00 until {day} 11:00."
            )
            expect(page.locator("#schedule-text")).to_have_text(
                f"A hold is scheduled from {day} 09:00 until {day} 11:00."
            )
            expect(page.locator("#schedule-cancel")).to_be_visible()
            page.fill("#hold-until", tomorrow.strftime("%Y-%m-%dT12:30"))
            page.click("#schedule")
            expect(page.locator("#schedule-text")).to_have_text(
                f"A hold is scheduled from {day} 09:00 until {day} 12:30."
            )

            page.screenshot(path=str(shots / "1-scheduled.png"))
            page.once("dialog", lambda dialog: dialog.accept())
            page.click("#hold")
            expect(page.locator("#domain-name")).to_have_text("example.com (held)")
            expect(page.locator("#action-result")).to_contain_text("example.com is held")
            expect(page.locator("#schedule-text")).to_have_text("Held now, until released.")
            with smtplib.SMTP("127.0.0.1", smtp_port, timeout=30) as client:
                for n in range(3):
                    client.sendmail(
                        "bob@sender.test",
                        [f"carol{n}@example.com"],
                        f"Subject: panel test {n}\r\n\r\nheld\r\n".encode(),
                    )
            held = page.locator("#messages tr[data-state='held']")
            expect(held).to_have_count(3)
            expect(held.first).to_contain_text("carol0@example.com")
            expect(held.first).to_contain_text("panel test 0")
            now = time.time()
            assert sample(now - 120)

            held.first.locator("a").click()
            expect(page.locator("#message-header")).to_contain_text("Subject: panel test 0")
            expect(page.locator("#jobs tr[data-state='held']")).to_have_count(1)
            with page.expect_download() as eml:
                page.click("#download-eml")
            assert eml.value.suggested_filename.endswith(".eml")
            assert b"Subject: panel test 0" in Path(eml.value.path()).read_bytes()
            page.go_back()
            expect(page.locator("#replay-text")).to_contain_text("Held: 3 messages wait")

            # a bulk action asks first too
            page.fill("#search-value", "bob@sender.test")
            page.click("#search")
            expect(page.locator("#bulk-row")).to_be_visible()
            page.once("dialog", lambda dialog: dialog.dismiss())
            page.click("#bulk-delete")
            expect(page.locator("#action-result")).to_have_text("Nothing changed: the bulk action was not confirmed.")
            expect(held).to_have_count(3)
            page.click("#search-clear")
            expect(page.locator("#bulk-row")).to_be_hidden()

            # a release not confirmed changes nothing; confirmed, it delivers
            questions: list[str] = []

            def answer(yes: bool) -> Callable[[Dialog], None]:
                def reply(dialog: Dialog) -> None:
                    questions.append(dialog.message)
                    if yes:
                        dialog.accept()
                    else:
                        dialog.dismiss()

                return reply

            page.once("dialog", answer(False))
            page.click("#release")
            expect(page.locator("#action-result")).to_have_text("Nothing changed: the release was not confirmed.")
            expect(page.locator("#domain-name")).to_have_text("example.com (held)")
            page.once("dialog", answer(True))
            page.click("#release")
            expect(page.locator("#action-result")).to_have_text(
                "example.com is released: its queue is being delivered as fast as its destination takes them."
            )
            asked = (
                "Release example.com? Its 3 queued messages will be delivered as fast as its destination takes them."
            )
            assert questions == [asked, asked]
            expect(page.locator("#domain-name")).to_have_text("example.com")
            expect(page.locator("#messages tbody tr[data-state]")).to_have_count(0)
            deadline = time.monotonic() + 20
            while len(sink.messages) < 3 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert sorted(m.recipients[0] for m in sink.messages) == [f"carol{n}@example.com" for n in range(3)]

            # the history: three samples, the charts and the replay's progress drawn from them
            assert sample(now - 60)
            assert sample(now)
            page.select_option("#window-domain", "3600")
            expect(page.locator("#chart-depth polygon[data-series='held']")).to_have_count(1)
            expect(page.locator("#chart-rates polyline[data-series='delivered_per_minute']")).to_have_count(1)
            expect(page.locator("#legend-rates")).to_contain_text("Delivered 0")
            expect(page.locator("#replay-text")).to_contain_text("Done: 3 messages delivered since")
            # proof of delivery for the window: totals, and the CSV with each message's reply
            page.fill("#report-from", time.strftime("%Y-%m-%dT%H:%M", time.localtime(now - 3600)))
            page.click("#report-show")
            expect(page.locator("#report-result")).to_contain_text("3 messages accepted in this window: 3 delivered")
            with page.expect_download() as report:
                page.click("#report-csv")
            assert report.value.suggested_filename == "example.com-delivery-report.csv"
            csv_text = Path(report.value.path()).read_text()
            assert csv_text.count("carol") == 3 and "delivered" in csv_text
            page.screenshot(path=str(shots / "2-domain.png"), full_page=True)

            page.click("#nav-audit")
            audit = page.locator("#audit tbody tr")
            expect(audit).to_have_count(4)
            expect(audit.nth(0)).to_contain_text("release")
            expect(audit.nth(1)).to_contain_text(
                f"now, until released; it replaced the hold scheduled from {day} 09:00 until {day} 12:30"
            )
            expect(audit.nth(2)).to_contain_text(f"from {day} 09:00 until {day} 12:30")
            expect(audit.nth(0)).to_contain_text("ops (127.0.0.1)")
            page.screenshot(path=str(shots / "3-audit.png"), full_page=True)

            page.click("#nav-domains")
            expect(page.locator("#chart-cluster-rates polyline")).to_have_count(2)
            page.screenshot(path=str(shots / "4-domains.png"), full_page=True)

            page.click("#sign-out")
            expect(page.locator("#login-view")).to_be_visible()
            expect(page.locator("#login-error")).to_have_text("Signed out: the token is forgotten in this tab.")
            assert page.evaluate("sessionStorage.getItem('relayx-token')") is None
            page.reload()
            expect(page.locator("#login-view")).to_be_visible()
            expect(page.locator("#domains-view")).to_be_hidden()
        finally:
            browser.close()


class PanelTests(NodeCase):
    @deferred_test
    async def test_operator_walk_in_browser(self) -> None:
        """When an operator signs in, schedules and edits a hold, holds a domain, sees new mail held, confirms its
        release (a dismissed confirmation changes nothing), the mail is delivered; the charts and the replay's progress
        show the sampled history, the audit log lists each change, and signing out forgets the token."""
        if not os.path.exists(CHROMIUM):
            raise SkipTest(f"{CHROMIUM} is not installed (apt-get install chromium); the panel test needs it")
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError:
            raise SkipTest("playwright is not installed (pip install '.[test]')") from None
        sink = LoopbackSink()
        sink.start()
        admin_port = free_port()
        node = await self.start_node(
            sink, admin_listen=[f"tcp:{admin_port}:interface=127.0.0.1"], admin_tokens={"ops": TOKEN}
        )
        history = node.history
        assert history is not None
        history.stop()  # the test takes the samples itself, at the times it names

        def sample(at: float) -> bool:
            def take() -> Deferred[bool]:
                return Deferred.fromCoroutine(history.sample(at))

            return bool(blockingCallFromThread(cast(IReactorFromThreads, reactor), take))  # type: ignore[arg-type]

        shots = Path(os.environ.get("RELAYX_PANEL_SHOTS") or tempfile.mkdtemp(prefix="relayx-panel-"))
        shots.mkdir(parents=True, exist_ok=True)
        await deferToThread(browse, admin_port, self.smtp_port, sink, sample, shots)
