"""Servers more than one module talks to, started once for the package."""
from __future__ import annotations

import pytest

from tests.server.launch import ROOT, launch, stop

TOOL_TEMPLATE = f"{ROOT}/server/chat_templates/smollm2_tool_use.jinja"


@pytest.fixture(scope="package")
def tool_server(smollm2_dir):
    """The bundled SmolLM2 with the chat template that shows it tools; its base URL."""
    proc, base = launch(smollm2_dir, "--chat-template", TOOL_TEMPLATE)
    yield base
    stop(proc)
