"""What a transport plugin implements and what the core hands it.

A transport is one long-running component (a WebSocket server, a broker connection) that
feeds messages into the bridge and takes messages out of it. It is registered by a plugin
through ``bridge_register_transports`` as a :class:`TransportType`, and the core builds one
instance per ``[transports.<name>]`` table of the config.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import trio

from .errors import BridgeError
from .identity import Identity
from .message import Message


@dataclass(frozen=True, slots=True)
class Accepted:
    """The message went through: ``message`` is what was delivered (enriched, with its id)."""

    message: Message


@dataclass(frozen=True, slots=True)
class Rejected:
    """The sender's fault (:class:`~bridge.DecodeError`, :class:`~bridge.ContractError`,
    :class:`~bridge.HopLimitExceeded`): answer the sender, do not retry."""

    error: BridgeError

    @property
    def reason(self) -> str:
        return str(self.error)


@dataclass(frozen=True, slots=True)
class Failed:
    """The bridge's fault (a plugin or destination raised). ``reason`` is safe to show.

    ``retry`` is true when the fault is transient (:class:`~bridge.StorageUnavailable`: a
    full disk, a database that is down): the source should hold the message and try again
    later rather than give it up (the AMQP transport keeps the delivery and submits it
    again; the chat closes with 1013)."""

    reason: str
    retry: bool = False


Outcome = Accepted | Rejected | Failed
#: Called once per submitted message with its outcome. Runs on the trio loop; must not block
#: and must not raise (the core logs and swallows what it raises). Not called for a message
#: the daemon stopped on before handling it (a drain that timed out, a second signal): it
#: may not be stored or delivered, so the source must not acknowledge it.
Settle = Callable[[Outcome], None]


@dataclass(frozen=True, slots=True)
class Health:
    """``ready`` is true only while the transport is fully serving (connected and consuming);
    ``detail`` says what is not, in words a person reads on ``/readyz``."""

    ready: bool
    detail: str = ""


@dataclass(frozen=True, slots=True)
class Codec:
    """One wire encoding. ``decode`` raises :class:`~bridge.DecodeError` on bad input."""

    name: str
    content_type: str
    binary: bool
    encode: Callable[[Any], bytes]
    decode: Callable[[bytes], Any]


class TransportContext(Protocol):
    """The core, as a transport sees it."""

    @property
    def name(self) -> str:
        """This transport's name in the config."""

    @property
    def state_dir(self) -> Path:
        """Where the transport may keep files (spools); created before ``run``."""

    @property
    def hop_limit(self) -> int:
        """Largest hop count a message may carry; above it, the core rejects the message."""

    def codec(self, name_or_content_type: str) -> Codec:
        """The codec registered under that name or content type (KeyError if none)."""

    async def submit(self, message: Message, settle: Settle) -> None:
        """Hand one inbound message to the pipeline. Waits while the pipeline is full: that
        wait is the backpressure a transport passes on to its source. With room, it returns
        at once without a checkpoint, so a burst submitted in a loop reaches the pipeline
        as one batch; the loop must checkpoint elsewhere (on its reads)."""

    async def replay(self, chat_id: str, since: str) -> Sequence[Message]:
        """Stored chat events of ``chat_id`` after ``since``, oldest first, through the
        ``bridge_replay_messages`` hook. Raises :class:`~bridge.ReplayGap` when ``since`` is
        older than what is kept and :class:`~bridge.ContractError` when it is unknown."""

    async def persist(self, messages: Sequence[Message]) -> None:
        """Store ``messages`` through the ``bridge_persist_messages`` hooks, as the pipeline
        does (a no-op without such hooks). A durable destination calls it at start for what
        it still held when the daemon stopped (see :class:`Transport`)."""

    async def authenticate(self, request: Mapping[str, Any]) -> Identity | None:
        """The identity the ``bridge_authenticate_handshake`` hooks give for a handshake
        ``request`` (None when no plugin authenticates)."""

    def count(self, metric: str, amount: float = 1.0, **labels: str) -> None:
        """Add to a named counter in ``/metrics`` (see docs/operations.md for the names)."""

    def observe(self, metric: str, value: float, **labels: str) -> None:
        """Record a value (seconds, bytes) in a named histogram."""

    def gauge(self, metric: str, value: float, **labels: str) -> None:
        """Set a named gauge (open sockets, spool depth)."""


class Transport(Protocol):
    """A running transport. The core calls, in this order: ``run`` (through
    ``nursery.start``), ``deliver`` any number of times, then at shutdown
    ``stop_accepting``, then ``drain`` under a deadline, then cancels ``run``.

    Optional: ``reconfigure(settings) -> bool`` (plain or ``async``). On every reload
    (SIGHUP) the core calls it with the new settings object, changed or not (so that files
    such as certificates are re-read); return True once they are in effect (keep live
    connections), False to keep the old ones until a restart (the core logs which fields
    wait). Without it, any settings change waits for a restart.

    Optional: ``async commit(kept, dropped)`` makes the transport a *durable destination*
    (an outbox). The core then hands it each batch before it persists the batch and before
    any other destination, whatever the order of the routes, so the sender's echo leaves
    only once the outbox has the event. ``deliver`` must store the messages durably and
    *hold* them (not send them on) until ``commit`` says which of them the persist step
    stored (``kept``: send them) and which it did not (``dropped``: forget them). What is
    still held after a crash is the transport's to reconcile at its next start: store it
    with :meth:`TransportContext.persist` (idempotent) and send it, so the history and the
    outbox agree (docs/architecture.md)."""

    name: str

    async def run(
        self,
        ctx: TransportContext,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve until cancelled. Call ``task_status.started()`` only once the transport can
        take deliveries (listening, or spool open): readiness is :meth:`health`."""

    async def deliver(self, messages: Sequence[Message]) -> None:
        """Take these messages for delivery, in order. Return once each is handed over (queued
        for its sockets, or durably spooled); raise if it could not be."""

    def stop_accepting(self) -> None:
        """Stop taking new input (close the listener, cancel the consumer). Idempotent."""

    async def drain(self) -> None:
        """Deliver what is queued and close peers gracefully. The caller bounds the time."""

    def health(self) -> Health:
        """Whether the transport is serving right now."""


class AsyncAPIContext(Protocol):
    """What a transport type's ``describe`` is given to write its part of the AsyncAPI 3.0
    document that ``bridged asyncapi`` prints."""

    @property
    def destination(self) -> bool:
        """Whether a route delivers to this transport (else messages only come in)."""

    def ref(self, *parts: str) -> dict[str, str]:
        """A reference to ``#/<parts>`` within the document (``~`` and ``/`` escaped)."""

    def id(self, *parts: str) -> str:
        """A server, channel or operation id made of ``parts``: characters AsyncAPI does not
        allow in ids become ``_``, and the parts are joined with dots."""

    def contract(self, name: str) -> dict[str, Any]:
        """A copy (yours to change) of a bundled contract document: ``"chat"`` (the
        WebSocket chat, AsyncAPI 3.0) or ``"notifications"`` (AsyncAPI 2.0)."""


#: What ``describe`` returns: entries for the document's ``servers``, ``channels`` and
#: ``operations``, each keyed by id (any of the three keys may be left out).
AsyncAPIFragment = Mapping[str, Mapping[str, Any]]


@dataclass(frozen=True, slots=True)
class TransportType:
    """A kind of transport a plugin offers: ``[transports.X] type = "<name>"``.

    ``settings``: a frozen dataclass; its fields are the keys the config table accepts.
    ``create(name, settings)``: builds the transport.
    ``reflects(settings)``: true when what is delivered to this transport can come back in
    through it (an AMQP exchange bound to the consumed queue); used to refuse route loops.
    ``describe(name, settings, context)``: this transport's servers, channels and operations
    for ``bridged asyncapi`` (:data:`AsyncAPIFragment`); None for a transport with no wire
    to describe (it is left out of the document).
    ``check(name, settings)``: the problems (text) ``create`` would meet outside the
    settings themselves (files that do not load: a TLS pair); ``bridged check``, ``run``
    and a reload report each as ``file:line: transports.NAME: problem``. A factory that
    raises stops ``bridged run`` with exit 1, naming the transport.
    """

    name: str
    settings: type[Any]
    create: Callable[[str, Any], Transport]
    reflects: Callable[[Any], bool] = lambda _settings: False
    describe: Callable[[str, Any, AsyncAPIContext], AsyncAPIFragment] | None = None
    check: Callable[[str, Any], Iterable[str]] | None = None


#: A route transform: a pure function from a message to the message to deliver, or None to
#: drop it on that route.
Transform = Callable[[Message], Message | None]
AsyncHook = Callable[..., Awaitable[Any] | Any]
