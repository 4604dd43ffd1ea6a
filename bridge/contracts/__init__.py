"""The project's own copies of the two wire contracts (AsyncAPI documents).

``chat.asyncapi.yaml`` (AsyncAPI 3.0, the WebSocket support chat) and
``notifications.asyncapi.yaml`` (AsyncAPI 2.0, the RabbitMQ notifications) are the seed
documents corrected where SPEC.md says so; every correction is listed in docs/contracts.md.
:func:`load` returns one of them as plain data (parsed once, then cached: treat it as
read-only and deep-copy before changing anything).
"""

from __future__ import annotations

import functools
from importlib.resources import files
from typing import Any

import yaml

CHAT = "chat.asyncapi.yaml"
NOTIFICATIONS = "notifications.asyncapi.yaml"


@functools.cache
def load(name: str) -> dict[str, Any]:
    """The contract document ``name`` (:data:`CHAT` or :data:`NOTIFICATIONS`)."""
    text = files(__name__).joinpath(name).read_text(encoding="utf-8")
    document = yaml.safe_load(text)
    if not isinstance(document, dict):
        raise ValueError(f"{name}: not a YAML mapping")
    return document
