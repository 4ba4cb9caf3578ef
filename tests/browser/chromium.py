"""Headless Chromium for tests: Debian's `chromium` and `chromium-driver`, driven by Selenium.

Rules of this module: nothing is downloaded (the driver and browser paths are given, so Selenium
Manager never runs); every wait is bounded; a missing browser, driver or selenium skips the test
on a developer's machine and fails it in CI (CI=true), where a skip would hide a broken setup.
Each browser gets a fresh profile directory and no network besides the loopback it is sent to.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import ci

# Debian's /usr/bin/chromium is a shell wrapper that sources /etc/chromium.d; the binary behind
# it takes exactly the flags below, nothing more.
BROWSER_CANDIDATES = ("/usr/lib/chromium/chromium", "chromium", "chromium-browser")
DRIVER_CANDIDATES = ("/usr/bin/chromedriver", "chromedriver")
FLAGS = (
    "--headless",
    "--no-sandbox",  # the test runs as root in a container: the sandbox cannot start there
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",  # containers have a 64 MB /dev/shm
    "--no-proxy-server",  # the page is on loopback; an inherited proxy must not be asked
    "--hide-scrollbars",
)
WAIT_S = 10.0  # every wait on the page; a poll is 1 s, so 10 s is ten chances
COMMAND_TIMEOUT_S = 30  # one WebDriver command (Selenium's own default is 120 s)


def _which(candidates: tuple[str, ...], env: str) -> str | None:
    override = os.environ.get(env)
    for name in ((override,) if override else candidates):
        path = name if os.path.isabs(name) else shutil.which(name)
        if path and os.access(path, os.X_OK):
            return path
    return None


def missing_or_fail(reason: str) -> None:
    """Skip (outside CI) or fail (in CI) with `reason`."""
    ci.missing_or_fail(reason, f"{reason} (CI must run the browser tests: install chromium, "
                       "chromium-driver and selenium)")


def require_browser() -> tuple[str, str]:
    """(browser, driver) paths, or skip/fail the test."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing_or_fail("selenium is not installed")
    browser = _which(BROWSER_CANDIDATES, "HUSHGATE_CHROMIUM")
    driver = _which(DRIVER_CANDIDATES, "HUSHGATE_CHROMEDRIVER")
    if browser is None:
        missing_or_fail("chromium not found (apt-get install chromium)")
    if driver is None:
        missing_or_fail("chromedriver not found (apt-get install chromium-driver)")
    assert browser is not None and driver is not None
    return browser, driver


@contextlib.contextmanager
def chromium(workdir: Path, *, width: int = 412, height: int = 915,
             scale: float = 2.0) -> Iterator[Any]:
    """A headless Chromium the size of a phone (a Pixel 7's CSS pixels), closed on exit."""
    browser, driver_path = require_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = workdir / "chromium-profile"
    profile.mkdir(parents=True, exist_ok=True)
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    # Headless windows are at least 500 px wide; a phone's viewport comes from emulation.
    options.add_argument(f"--window-size={max(width, 500)},{height}")
    options.add_experimental_option("mobileEmulation", {
        "deviceMetrics": {"width": width, "height": height, "pixelRatio": scale, "touch": True},
    })
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(executable_path=driver_path, log_output=str(workdir / "chromedriver.log"))
    driver = webdriver.Chrome(options=options, service=service)
    try:
        with contextlib.suppress(AttributeError):
            driver.command_executor._client_config.timeout = COMMAND_TIMEOUT_S
        driver.set_page_load_timeout(COMMAND_TIMEOUT_S)
        driver.set_script_timeout(COMMAND_TIMEOUT_S)
        yield driver
    finally:
        driver.quit()


def wait_for(predicate: Callable[[], Any], what: str, timeout_s: float = WAIT_S) -> Any:
    """Poll `predicate` until it returns something truthy; fail naming `what` after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(0.05)


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR; AssertionError when it is not a PNG."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def png_pixels(data: bytes) -> tuple[int, int, int, list[bytes]]:
    """(width, height, bytes per pixel, rows of raw pixel bytes) of an 8-bit, non-interlaced
    RGB or RGBA PNG (what Chromium's screenshots are); AssertionError for anything else."""
    width, height = png_size(data)
    depth, colour, interlace = data[24], data[25], data[28]
    assert depth == 8 and colour in (2, 6) and interlace == 0, (depth, colour, interlace)
    bpp = 3 if colour == 2 else 4
    idat, pos = b"", 8
    while pos < len(data):
        length = int.from_bytes(data[pos : pos + 4], "big")
        kind = data[pos + 4 : pos + 8]
        if kind == b"IDAT":
            idat += data[pos + 8 : pos + 8 + length]
        pos += 12 + length
    raw = zlib.decompress(idat)
    stride = width * bpp
    rows: list[bytes] = []
    prev = bytearray(stride)
    for y in range(height):
        base = y * (stride + 1)
        kind, line = raw[base], bytearray(raw[base + 1 : base + 1 + stride])
        for i in range(stride):  # PNG filters (RFC 2083 6)
            a = line[i - bpp] if i >= bpp else 0
            b = prev[i]
            c = prev[i - bpp] if i >= bpp else 0
            if kind == 1:
                line[i] = (line[i] + a) & 0xFF
            elif kind == 2:
                line[i] = (line[i] + b) & 0xFF
            elif kind == 3:
                line[i] = (line[i] + (a + b) // 2) & 0xFF
            elif kind == 4:
                pa, pb, pc = abs(b - c), abs(a - c), abs(a + b - 2 * c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 0xFF
        rows.append(bytes(line))
        prev = line
    return width, height, bpp, rows


def region_colours(data: bytes, x: int, y: int, w: int, h: int) -> int:
    """How many distinct colours the PNG has inside the rectangle (device pixels): a blank or
    single-colour area has 1, rendered text has dozens (anti-aliasing)."""
    width, height, bpp, rows = png_pixels(data)
    colours = set()
    for row in rows[max(0, y) : min(height, y + h)]:
        for px in range(max(0, x), min(width, x + w)):
            colours.add(row[px * bpp : px * bpp + 3])
    return len(colours)
