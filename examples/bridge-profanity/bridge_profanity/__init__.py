"""Refuse chat messages that contain a listed word (case-insensitive, whole words)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from bridge import CHAT_EVENT, ContractError, Message, PluginContext, hookimpl, setting


@dataclass(frozen=True)
class Settings:
    words: tuple[str, ...] = setting((), doc="words that make a chat message refused")


class Plugin:
    def __init__(self) -> None:
        self._pattern: re.Pattern[str] | None = None

    @hookimpl
    def bridge_settings_class(self) -> type[Any]:
        return Settings

    @hookimpl
    def bridge_startup(self, context: PluginContext) -> None:
        words = context.settings.words
        if words:
            alternatives = "|".join(re.escape(w) for w in words)
            self._pattern = re.compile(rf"\b({alternatives})\b", re.IGNORECASE)

    @hookimpl
    def bridge_validate_message(self, message: Message, stage: str) -> None:
        if self._pattern is None or stage != "inbound" or message.kind != CHAT_EVENT:
            return
        for i, item in enumerate(message.body.get("message") or ()):
            text = item.get("text") if isinstance(item, dict) else None
            if isinstance(text, str) and self._pattern.search(text):
                raise ContractError(f"message.{i}.text: contains a refused word",
                                    field=f"message.{i}.text", rule="profanity")
