"""Helpers for tests that drive a real browser (Debian's chromium + chromium-driver)."""
