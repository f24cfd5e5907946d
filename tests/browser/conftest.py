"""Headless Chromium for the page's tests: Debian's `chromium`, driven by Playwright.

Never a browser download (`playwright install`): the binary is the system's, and where it
is missing the tests are skipped with a reason the summary shows (`.ci/run` installs it).
"""

from __future__ import annotations

import base64
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]

PROGRESS_RECORDER = """
window.__progress = [];
document.addEventListener("DOMContentLoaded", () => {
  const bar = document.getElementById("progress");
  new MutationObserver(() => window.__progress.push([bar.value, bar.max])).observe(bar, {
    attributes: true,
    attributeFilter: ["value", "max"],
  });
});
"""
"""Every value the progress bar takes, in order (the test reads `window.__progress`)."""


MISSING = (
    "browser tests skipped: Chromium is not installed (apt-get install chromium; "
    ".ci/run installs it)"
)

HTTP_ERROR_LOG = "Failed to load resource: the server responded with a status of"


def chromium_path() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Skipped before any fixture starts a service, with the reason in the summary."""
    if chromium_path() is None:
        skip = pytest.mark.skip(reason=MISSING)
        for item in items:
            if "browser" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """One Chromium per test module (a module's tests share it; about a second to start)."""
    path = chromium_path()
    if path is None:
        pytest.skip(MISSING)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=path, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@dataclass
class Tab:
    """A page in a fresh browser context, with what it asked for and complained about."""

    page: Any
    requests: list[Any] = field(default_factory=list)
    console_errors: list[str] = field(default_factory=list)

    def console(self, message: Any) -> None:
        # Chromium logs each HTTP error answer (the 422s and 401s the tests provoke, the
        # 404 of the GET /v1/models probe) as a console error: the tests check those
        # answers themselves. A CSP refusal or a script error is logged otherwise.
        if message.type == "error" and not message.text.startswith(HTTP_ERROR_LOG):
            self.console_errors.append(f"{message.text} ({message.location.get('url')})")

    def assert_clean(self, base: str, key: str | None = None) -> None:
        """Nothing loaded from another origin, no console error (a CSP violation is one),
        and the key never in a URL."""
        assert not self.console_errors, self.console_errors
        foreign = [
            r.url for r in self.requests if not r.url.startswith((base + "/", "blob:", "data:"))
        ]
        assert not foreign, f"requests to other origins: {foreign}"
        if key is not None:
            assert not [r.url for r in self.requests if key in r.url]

    def drop(self, selector: str, image: Path) -> None:
        """Drop a file on an element, as a person dragging it from their desktop would."""
        transfer = self.page.evaluate_handle(
            """({data, name}) => {
                const bytes = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
                const transfer = new DataTransfer();
                transfer.items.add(new File([bytes], name, {type: "image/png"}));
                return transfer;
            }""",
            {"data": base64.b64encode(image.read_bytes()).decode(), "name": image.name},
        )
        self.page.dispatch_event(selector, "dragover", {"dataTransfer": transfer})
        self.page.dispatch_event(selector, "drop", {"dataTransfer": transfer})


@pytest.fixture
def tab(browser: Any) -> Iterator[Tab]:
    context = browser.new_context(accept_downloads=True, viewport={"width": 1200, "height": 900})
    context.add_init_script(PROGRESS_RECORDER)
    page = context.new_page()
    page.set_default_timeout(60_000)
    watched = Tab(page)
    page.on("request", lambda r: watched.requests.append(r))
    page.on("console", watched.console)
    page.on("pageerror", lambda e: watched.console_errors.append(str(e)))
    yield watched
    context.close()
