"""The operator page in a real headless Chromium (Debian package) driven by Python Playwright."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn
from ordering_fixtures import free_port_for_tests, make_tokens
from playwright.sync_api import BrowserContext, Page, expect, sync_playwright
from sqlalchemy.orm import Session, sessionmaker

from fleetwatch.stack import Stack
from ordering.api import create_app

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture()
def served(seeded_db: tuple[str, sessionmaker[Session]]) -> Iterator[tuple[str, dict[str, str]]]:
    """The app under uvicorn on a free local port; yields its base URL and one token per role."""
    _, sessions = seeded_db
    port = free_port_for_tests()
    server = uvicorn.Server(uvicorn.Config(create_app(sessions), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", make_tokens(sessions)
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrowserContext]:
    """Debian's Chromium (installed by the project's stack code when missing), headless, fresh profile."""
    chromium = Stack.ensure_browser()
    with sync_playwright() as pw:
        ctx = pw.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")), executable_path=str(chromium), headless=True,
            args=CHROMIUM_ARGS, viewport={"width": 1400, "height": 1000})
        yield ctx
        ctx.close()


def log_in(page: Page, base: str, secret: str) -> None:
    page.goto(base + "/")
    page.fill("#token", secret)
    page.click("#login-btn")
    expect(page.locator("#view-orders")).to_be_visible()


def test_operator_logs_in_filters_opens_order_sees_chart_and_acknowledges(
        served: tuple[str, dict[str, str]], browser: BrowserContext, artifacts: Path) -> None:
    base, tokens = served
    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    external: list[str] = []
    page.on("request", lambda req: None if req.url.startswith(base) else external.append(req.url))

    page.goto(base + "/")
    expect(page.locator("#view-login")).to_be_visible()
    page.fill("#token", "fw_wrong")
    page.click("#login-btn")
    expect(page.locator("#login-error")).to_have_text("That token is not valid.")
    page.screenshot(path=str(artifacts / "ordering-login.png"))
    errors.clear()  # the refused token above was logged as a failed (401) request, as it should be

    log_in(page, base, tokens["operator"])
    rows = page.locator("#orders-table tbody tr")
    expect(rows).to_have_count(3)
    page.select_option("#f-priority", "P1")
    page.click("#f-apply")
    expect(rows).to_have_count(1)
    expect(rows.first).to_contain_text("T00001")
    expect(page.locator("#o-range")).to_have_text("1–1 of 1")
    page.screenshot(path=str(artifacts / "ordering-orders.png"), full_page=True)

    rows.first.locator("a", has_text="#1").click()
    expect(page.locator("#order-title")).to_contain_text("T00001 · OIL-PUMP")
    chart = page.locator("#order-chart svg.trend-chart")
    expect(chart).to_be_visible()
    expect(chart.locator("polyline.series").first).to_be_visible()
    expect(chart.locator("line.threshold")).to_have_count(1)
    expect(chart.locator("line.trend")).to_have_count(1)
    expect(chart.locator("circle.crossing")).to_have_count(1)
    expect(chart).to_contain_text("forecast failure")
    expect(page.locator("#order-status")).to_have_text("placed")
    page.screenshot(path=str(artifacts / "ordering-order-detail.png"), full_page=True)

    page.click("#order-actions button[data-to=acknowledged]")
    expect(page.locator("#order-status")).to_have_text("acknowledged")
    expect(page.locator("#history tbody tr")).to_have_count(2)
    expect(page.locator("#history")).to_contain_text("api:test operator")
    page.screenshot(path=str(artifacts / "ordering-order-acknowledged.png"), full_page=True)

    page.click("text=‹ all orders")
    page.select_option("#f-priority", "")
    page.click("#f-apply")
    expect(page.locator("#orders-table tbody tr[data-id='1'] td.status")).to_have_text("acknowledged")

    page.click("#nav-fleet")
    expect(page.locator("#fleet-summary")).to_contain_text("6 tractors reporting")
    expect(page.locator("#tractors tbody tr")).to_have_count(6)
    expect(page.locator("#tractors tbody tr").first).to_contain_text("T00001")
    page.screenshot(path=str(artifacts / "ordering-fleet.png"), full_page=True)
    page.locator("#tractors tbody tr").first.locator("a").click()
    expect(page.locator("#tractor-chart svg.trend-chart")).to_be_visible()
    page.screenshot(path=str(artifacts / "ordering-tractor.png"), full_page=True)
    assert not errors, errors
    assert not external, f"the page fetched outside the app: {external}"


def test_analyst_sees_orders_but_no_actions_and_can_cancel_nothing(
        served: tuple[str, dict[str, str]], browser: BrowserContext) -> None:
    base, tokens = served
    page = browser.new_page()
    log_in(page, base, tokens["analyst"])
    expect(page.locator("#orders-table tbody tr")).to_have_count(3)
    expect(page.locator("#orders-table button.act")).to_have_count(0)
    page.click("#logout")
    expect(page.locator("#view-login")).to_be_visible()


def test_operator_cancels_with_a_reason(served: tuple[str, dict[str, str]], browser: BrowserContext) -> None:
    base, tokens = served
    page = browser.new_page()
    log_in(page, base, tokens["operator"])
    page.locator("#orders-table tbody tr[data-id='3'] button[data-to=cancelled]").click()
    page.select_option("#cancel-code", "false_alarm")
    page.fill("#cancel-reason", "soot sensor replaced last week")
    page.click("#cancel-ok")
    expect(page.locator("#orders-table tbody tr[data-id='3']")).to_have_count(0)  # default filter: open orders
    page.select_option("#f-status", "cancelled")
    page.click("#f-apply")
    expect(page.locator("#orders-table tbody tr[data-id='3'] td.status")).to_have_text("cancelled")
