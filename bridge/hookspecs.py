"""The hooks a plugin may implement. Every hook may be ``async def`` unless it says it is a
registration hook (those run once at start-up, synchronously).

The core calls every implementation itself, in pluggy's order (see ``bridge.plugins``), and
awaits whatever is awaitable, so sync and async implementations mix freely. No hook uses
``firstresult`` or wrappers: where one answer is wanted the spec says how it is chosen
(``bridge.plugins.build_plugin_manager`` refuses wrapper implementations at start-up).
Arguments are only ever added, never renamed or removed; an implementation may accept
fewer arguments than the spec lists.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from .api import Command, PluginContext
    from .identity import Identity
    from .message import Message
    from .transport import Codec, Transform, TransportType

hookspec = pluggy.HookspecMarker("bridge")


@hookspec
def bridge_register_transports(register: Callable[[TransportType], None]) -> None:
    """Registration hook (sync). Call ``register(TransportType(...))`` for each kind of
    transport the plugin offers; the name is what ``[transports.X] type =`` selects."""


@hookspec
def bridge_register_codecs(register: Callable[[Codec], None]) -> None:
    """Registration hook (sync). Call ``register(Codec(...))`` for each wire encoding."""


@hookspec
def bridge_register_transforms(register: Callable[[str, Transform], None]) -> None:
    """Registration hook (sync). Call ``register(name, transform)`` for each named transform
    that routes may list in ``transforms = [...]``. Names are global: a clash is an error."""


@hookspec
def bridge_register_commands(register: Callable[[Command], None]) -> None:
    """Registration hook (sync). Call ``register(Command(...))`` to add a ``bridged``
    subcommand. The plugins of the config the command line names (``-c``) are asked; without
    one (``bridged --help``), the built-in plugins. The first registration of a name wins."""


@hookspec
def bridge_settings_class() -> type[Any] | None:
    """Sync. The frozen dataclass whose fields are the keys of this plugin's
    ``[plugins.<name>]`` table, or None when it takes no settings. Unknown keys in that table
    are config errors."""


@hookspec
def bridge_startup(context: PluginContext) -> None:
    """Called once before any transport starts. ``context.settings`` is this plugin's own
    settings object; ``context.nursery`` may start background tasks that live until
    shutdown. An exception stops the daemon from starting."""


@hookspec
def bridge_reconfigure(context: PluginContext, previous: Any) -> bool | None:
    """Called on a reload (SIGHUP) when this plugin's ``[plugins.<name>]`` settings changed;
    only the implementation of the plugin concerned is called. ``context.settings`` already
    holds the new settings, ``previous`` the old ones. Return True once the new settings are
    in effect; False or None keeps the old ones (put back in ``context.settings``) and the
    daemon logs that a restart is needed to apply them."""


@hookspec
def bridge_shutdown(context: PluginContext) -> None:
    """Called once after every transport has drained. Release resources here. Exceptions
    are logged and do not stop the other plugins' shutdown."""


@hookspec
def bridge_validate_message(message: Message, stage: str) -> None:
    """Check ``message`` against its contract. ``stage`` is ``"inbound"`` (as received from
    its source, before enrichment) or ``"outbound"`` (as it will be delivered). Return None
    to accept; raise :class:`bridge.ContractError` to reject. All implementations are
    called; the first to raise rejects the message."""


@hookspec
def bridge_enrich_message(message: Message) -> Message | None:
    """Return a new message derived from ``message`` (ids, timestamps, identity), or None
    to leave it unchanged. Implementations are chained: each one receives the previous
    one's result."""


@hookspec
def bridge_persist_messages(messages: Sequence[Message], destinations: Sequence[tuple[str, ...]]
                            ) -> Sequence[Message] | None:
    """Store these messages (a batch, in delivery order) before they are delivered. Return
    only once they are durable: the sender's confirmation is sent after this returns. All
    implementations are called; one that raises fails the batch, which the core then
    retries one message at a time so that only the bad message fails.

    ``destinations[i]`` names the transports ``messages[i]`` is routed to (a store that
    keeps an outbox writes it in the same transaction). A store that assigns the event ids
    itself (cluster mode's, where the database orders a chat's events) returns the messages
    as stored, aligned with ``messages``: the core delivers those instead. A message the
    store recognised as stored already (its dedupe key) comes back as the original event
    with ``meta["client_msg_retry"] = True``; it is echoed to its sender only. Return None
    to leave the messages as they are; at most one implementation may return messages."""


@hookspec
def bridge_wrap_transport(name: str, transport: Any) -> Any | None:
    """Sync, called once per configured transport when the daemon is built, before any
    plugin starts. Return an object that stands in for ``transport`` (the same interface,
    :class:`bridge.Transport`: typically it forwards to ``transport`` and changes how
    ``deliver`` works), or None to leave it. Each implementation gets what the one before
    returned. Cluster mode uses it to put its sequencer in front of the chat's sockets."""


@hookspec
def bridge_replay_messages(chat_id: str, since: str) -> Sequence[Message] | None:
    """Stored chat events of ``chat_id`` after event id ``since``, oldest first, or None if
    this plugin keeps no history. The first implementation to return a list wins. Raise
    :class:`bridge.ReplayGap` when ``since`` is older than what is kept. ``since`` may also
    be ``last:N`` (N: 0 to 999999): the newest N events kept, oldest first, never a gap (a
    WebSocket client's ``last=N``); a plugin that does not know that form raises
    :class:`bridge.ContractError`."""


@hookspec
def bridge_authenticate_handshake(request: Mapping[str, Any]) -> Identity | None:
    """Authenticate a WebSocket handshake. ``request`` holds ``path``, ``chat_id``,
    ``headers`` (lower-case names), ``query``, ``subprotocols`` and ``remote``. Return a
    :class:`bridge.Identity`, None to abstain, or raise :class:`bridge.AuthError` to refuse. The
    first identity returned wins; when every implementation abstains the handshake is
    accepted anonymously."""
