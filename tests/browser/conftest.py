"""Fixtures for the real-browser tests (the environment is described in _harness.py)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
from _harness import (
    CHROMIUM,
    CHROMIUM_FLAGS,
    HTTP_PORT,
    INSTALL_HINT,
    NAMESPACE_ADDRESS,
    PUBLISH_TOKEN,
    VIEW_TOKEN,
    NetworkNamespace,
    WhepfanProcess,
    open_context,
)


@pytest.fixture(scope="module")
def namespace(request: pytest.FixtureRequest) -> Iterator[NetworkNamespace]:
    module = request.module.__name__.rsplit(".", 1)[-1].replace("test_", "")[:6]
    created = NetworkNamespace.create(f"wf-{os.getpid()}-{module}")
    yield created
    created.delete()


@pytest.fixture(scope="module")
def server(namespace: NetworkNamespace, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``whepfan serve`` in the namespace; yields its base URL (reachable from the browser)."""
    process = WhepfanProcess(
        namespace,
        [
            "serve",
            "--http",
            f"127.0.0.1:{HTTP_PORT}",
            "--udp",
            "0.0.0.0:8189",
            "--public-ip",
            NAMESPACE_ADDRESS,
            "--publish-token",
            PUBLISH_TOKEN,
            "--view-token",
            VIEW_TOKEN,
        ],
        tmp_path_factory.mktemp("server") / "whepfan.log",
    )
    process.wait_for_output(r"WHEP on http://")
    yield f"http://127.0.0.1:{HTTP_PORT}"
    process.stop()
    # Every request the browsers made must have been a client error at worst.
    assert "internal error" not in process.log() and "Traceback" not in process.log(), (
        process.log()[-4000:]
    )


@pytest.fixture(scope="module")
def browser(namespace: NetworkNamespace, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """Headless Chromium in the namespace (one per module, pages opened per test)."""
    try:
        from playwright.sync_api import Error as PlaywrightError
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail(f"Playwright for Python is missing; {INSTALL_HINT}", pytrace=False)
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} is missing; {INSTALL_HINT}", pytrace=False)
    wrapper = tmp_path_factory.mktemp("chromium") / "chromium-in-namespace"
    wrapper.write_text(
        f'#!/bin/sh\nexec ip netns exec {namespace.name} {CHROMIUM} "$@"\n', encoding="utf-8"
    )
    wrapper.chmod(0o755)
    playwright = sync_playwright().start()
    try:
        chromium = playwright.chromium.launch(
            executable_path=str(wrapper), headless=True, args=CHROMIUM_FLAGS
        )
    except PlaywrightError as exc:
        playwright.stop()
        pytest.fail(f"Chromium could not start in the namespace: {exc}", pytrace=False)
    yield chromium
    chromium.close()
    playwright.stop()


@pytest.fixture
def context(browser: Any) -> Iterator[Any]:
    """A fresh browser context per test (pages, permissions and routes of its own)."""
    created = open_context(browser)
    yield created
    created.close()
