"""Who is on the other end of a connection, as an authentication plugin established it."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass


@dataclass(frozen=True)
class Identity:
    """An authenticated client.

    ``subject`` is who speaks (stamped as ``sender`` on what the client sends); ``chats`` the
    chat ids or ``fnmatch`` patterns (``support-*``, case-sensitive) the client may join;
    ``role`` a free-form role or None; ``expires_at`` the Unix time (seconds) after which
    the credentials are no longer valid and a live connection must be closed, or None.
    """

    subject: str
    chats: tuple[str, ...] = ()
    role: str | None = None
    expires_at: float | None = None

    def may_join(self, chat_id: str) -> bool:
        """Whether ``chat_id`` is one of :attr:`chats` or matches one of its patterns."""
        return any(fnmatch.fnmatchcase(chat_id, pattern) for pattern in self.chats)

    def expired(self, now: float) -> bool:
        """Whether the credentials have expired at Unix time ``now``."""
        return self.expires_at is not None and now >= self.expires_at
