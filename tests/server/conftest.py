"""Servers more than one module talks to, started once for the package, and the browser."""
from __future__ import annotations

import shutil

import pytest

from tests.server.launch import ROOT, launch, stop

TOOL_TEMPLATE = f"{ROOT}/server/chat_templates/smollm2_tool_use.jinja"


@pytest.fixture(scope="package")
def tool_server(smollm2_dir):
    """The bundled SmolLM2 with the chat template that shows it tools; its base URL."""
    proc, base = launch(smollm2_dir, "--chat-template", TOOL_TEMPLATE)
    yield base
    stop(proc)


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's chromium (session-scoped: set up before a module's or the package's server, so a
    skip starts none)."""
    path = shutil.which("chromium")
    if path is None:
        pytest.skip("chromium is not installed (Debian: apt-get install chromium)")
    return path
