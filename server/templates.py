"""Chat templates: what --chat-template names (a file, a template shipped in server/chat_templates/
by name, or the template text itself), and the shipped template a model is served with when its
own shows no tools."""
from __future__ import annotations

import hashlib
import os

SHIPPED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "chat_templates")

# sha256 of a model's own chat template -> the shipped template that renders every conversation
# without tools exactly as it does, and also shows the model its tools and earlier calls
# (tests/server/test_tool_calls.py checks both). SmolLM2-*-Instruct share this template.
TOOL_TEMPLATES = {
    "872be49dbb638044ad01b60388f48d469ff2980e5f0dccdc22ec907db54d0788": "smollm2_tool_use",
}


def shipped() -> list[str]:
    """The names of the templates in the package."""
    return sorted(f.removesuffix(".jinja") for f in os.listdir(SHIPPED_DIR) if f.endswith(".jinja"))


def resolve(value: str) -> str:
    """--chat-template's template. A file path, a shipped template's name (with or without .jinja),
    else the value must itself be a Jinja template. ValueError says what is wrong."""
    name = value.removesuffix(".jinja")
    if os.path.isfile(value):
        with open(value, encoding="utf-8") as f:
            text = f.read()
    elif name in shipped():
        text = read_shipped(name)
    elif any(mark in value for mark in ("{{", "{%")):
        text = value
    else:
        raise ValueError(f"chat_template: {value!r} is neither a file, a shipped template "
                         f"({', '.join(shipped())}) nor a Jinja template")
    check(text)
    return text


def check(text: str) -> None:
    import jinja2

    try:
        jinja2.Environment().parse(text)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"chat_template: not a valid Jinja template: {e}") from None


def read_shipped(name: str) -> str:
    with open(os.path.join(SHIPPED_DIR, f"{name}.jinja"), encoding="utf-8") as f:
        return f.read()


def tool_template_for(own: str | None) -> str | None:
    """The shipped name of the tool-capable template that stands in for `own`, if there is one."""
    if own is None:
        return None
    return TOOL_TEMPLATES.get(hashlib.sha256(own.encode()).hexdigest())
