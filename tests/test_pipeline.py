"""The pipeline through a real in-process daemon with memory transports."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, cast

import pluggy
import pytest
import trio
import trio.testing

from bridge import (
    CLIENT_MSG_RETRY,
    Accepted,
    ConfigError,
    ContractError,
    DeliveryError,
    Failed,
    HopLimitExceeded,
    Message,
    Rejected,
    TransportType,
    hookimpl,
)
from bridge.assembly import Assembly
from bridge.daemon import Daemon
from bridge.plugins import build_plugin_manager
from bridge.testing import run_bridge
from bridge_plugins.memory import MemorySettings, MemoryTransport

TWO = """
# Core behaviour only: arbitrary bodies, which the built-in validation, enrichment and
# history would refuse, reshape or store as chat updates.
[plugins]
disable = ["enrichment", "validation", "history"]

[daemon]
pipeline_queue = 4
batch_max = 2

[transports.a]
type = "memory"

[transports.b]
type = "memory"
capacity = 2

[[routes]]
name = "a-to-b"
from = "a"
to = ["b"]
"""

MakeConfig = Callable[..., Assembly]


def mem(daemon: Daemon, name: str) -> MemoryTransport:
    return cast(MemoryTransport, daemon.transports[name])


async def test_message_flows_source_to_destination(bridge_config: MakeConfig) -> None:
    async with run_bridge(bridge_config(TWO)) as daemon:
        outcome = await mem(daemon, "a").inject({"n": 1}, chat_id="c1")
        assert isinstance(outcome, Accepted)
        got = await mem(daemon, "b").received.receive()
        assert (got.body, got.chat_id, got.source) == ({"n": 1}, "c1", "a")


async def test_a_recognised_retry_goes_back_to_its_source_only(
        bridge_config: MakeConfig) -> None:
    """A message marked ``CLIENT_MSG_RETRY`` (the original event again) is delivered only
    to its source transport, on the routes that lead there: the others had it already."""
    config = TWO + '[[routes]]\nname = "a-to-a"\nfrom = "a"\nto = ["a", "b"]\n'
    async with run_bridge(bridge_config(config)) as daemon:
        a, b = mem(daemon, "a"), mem(daemon, "b")
        retry = await a.inject({"n": 1}, chat_id="c1", meta={CLIENT_MSG_RETRY: True})
        assert isinstance(retry, Accepted)
        assert (await a.received.receive()).body == {"n": 1}
        assert b.received.statistics().current_buffer_used == 0  # delivered before settled
        assert isinstance(await a.inject({"n": 2}, chat_id="c1"), Accepted)  # not a retry:
        assert [(await b.received.receive()).body for _ in range(2)] == [{"n": 2}, {"n": 2}]
        assert (await a.received.receive()).body == {"n": 2}


class SyncAndAsync:
    """A sync validator, a sync and an async enricher chained, an async persister."""

    def __init__(self) -> None:
        self.persisted: list[str] = []

    @hookimpl
    def bridge_validate_message(self, message: Message, stage: str) -> None:
        if message.body.get("kind") == "bad":
            raise ContractError("kind: must not be 'bad'", field="kind", rule="const")

    @hookimpl(tryfirst=True)
    def bridge_enrich_message(self, message: Message) -> Message:
        return message.evolve(id="id-" + str(message.body["n"]))

    @hookimpl
    async def bridge_persist_messages(self, messages: Sequence[Message]) -> None:
        await trio.lowlevel.checkpoint()
        self.persisted.extend(m.id for m in messages)


class AsyncEnricher:
    @hookimpl
    async def bridge_enrich_message(self, message: Message) -> Message | None:
        await trio.lowlevel.checkpoint()
        return message.evolve(meta={"seen_id": message.id})  # runs after the sync one


async def test_sync_and_async_hooks_mix(bridge_config: MakeConfig) -> None:
    plugin = SyncAndAsync()
    async with run_bridge(bridge_config(TWO), extra_plugins=[plugin, AsyncEnricher()]) as daemon:
        ok = await mem(daemon, "a").inject({"n": 1})
        bad = await mem(daemon, "a").inject({"n": 2, "kind": "bad"})
        got = await mem(daemon, "b").received.receive()
    assert isinstance(ok, Accepted)
    assert ok.message.id == "id-1"
    assert got.meta == {"seen_id": "id-1"}
    assert isinstance(bad, Rejected)
    assert isinstance(bad.error, ContractError)
    assert bad.error.field == "kind"
    assert plugin.persisted == ["id-1"]


class Explodes:
    @hookimpl
    async def bridge_enrich_message(self, message: Message) -> Message | None:
        if message.body.get("boom"):
            raise RuntimeError("plugin bug")
        return None


async def test_plugin_raising_for_one_message_does_not_stop_the_next(
    bridge_config: MakeConfig, caplog: pytest.LogCaptureFixture
) -> None:
    async with run_bridge(bridge_config(TWO), extra_plugins=[Explodes()]) as daemon:
        first = await mem(daemon, "a").inject({"boom": True}, id="m-1")
        second = await mem(daemon, "a").inject({"n": 2}, id="m-2")
        got = await mem(daemon, "b").received.receive()
    assert isinstance(first, Failed)
    assert "RuntimeError" in first.reason
    assert isinstance(second, Accepted)
    assert got.id == "m-2"
    assert any("m-1" in r.getMessage() for r in caplog.records if r.levelname == "ERROR")


class PoisonPersist:
    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.gate = trio.Event()

    @hookimpl
    async def bridge_persist_messages(self, messages: Sequence[Message]) -> None:
        await self.gate.wait()
        self.calls.append([m.id for m in messages])
        if any(m.body.get("poison") for m in messages):
            raise OSError("disk says no")


async def test_persist_failure_is_isolated_to_its_message(bridge_config: MakeConfig) -> None:
    plugin = PoisonPersist()
    config = bridge_config(TWO.replace("batch_max = 2", "batch_max = 8"))
    async with run_bridge(config, extra_plugins=[plugin]) as daemon:
        a = mem(daemon, "a")
        results: dict[str, Any] = {}

        async def send(i: str, body: dict[str, Any]) -> None:
            results[i] = await a.inject(body, id=i)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send, "m0", {"n": 0})
            await trio.testing.wait_all_tasks_blocked()  # m0 is in the pipeline, held at persist
            # queued together, while m0 is persisting: the next batch holds both
            nursery.start_soon(send, "m1", {"poison": True})
            nursery.start_soon(send, "m2", {"n": 2})
            await trio.testing.wait_all_tasks_blocked()
            plugin.gate.set()
        delivered = [(await mem(daemon, "b").received.receive()).id for _ in range(2)]
    assert isinstance(results["m0"], Accepted)
    assert isinstance(results["m1"], Failed)
    assert isinstance(results["m2"], Accepted)
    assert delivered == ["m0", "m2"]
    first, batch, *retries = plugin.calls
    assert first == ["m0"]
    assert sorted(batch) == ["m1", "m2"]  # the batch, then one by one
    assert retries == [[i] for i in batch]


class SeesPrepared(PoisonPersist):
    def __init__(self) -> None:
        super().__init__()
        self.enriched: list[str] = []

    @hookimpl
    def bridge_enrich_message(self, message: Message) -> None:
        self.enriched.append(message.id)


async def test_the_next_batch_is_prepared_while_one_persists(bridge_config: MakeConfig
                                                             ) -> None:
    plugin = SeesPrepared()
    async with run_bridge(bridge_config(TWO), extra_plugins=[plugin]) as daemon:
        a, b = mem(daemon, "a"), mem(daemon, "b")
        await a.inject({"n": 0}, id="m0", wait=False)
        await trio.testing.wait_all_tasks_blocked()  # m0 is held at persist
        await a.inject({"n": 1}, id="m1", wait=False)
        await trio.testing.wait_all_tasks_blocked()
        assert plugin.calls == []  # m0 still persisting...
        assert plugin.enriched == ["m0", "m1"]  # ...and m1 prepared meanwhile
        plugin.gate.set()
        got = [(await b.received.receive()).id for _ in range(2)]
    assert got == ["m0", "m1"]
    assert plugin.calls == [["m0"], ["m1"]]


class StuckPersist:
    @hookimpl
    async def bridge_persist_messages(self, messages: Sequence[Message]) -> None:
        await trio.sleep_forever()  # a disk that hangs


async def test_a_drain_that_times_out_settles_nothing_unfinished(bridge_config: MakeConfig
                                                                 ) -> None:
    """m0 hangs in persist, m1 is prepared behind it, m2 waits in the queue: when the drain
    times out and the pipeline is cancelled, none of them may be reported Accepted (an AMQP
    source would acknowledge it, and the message would be lost)."""
    config = bridge_config(TWO.replace("batch_max = 2", "batch_max = 1")
                           .replace("[daemon]", "[daemon]\ndrain_timeout_s = 0.2"))
    outcomes: dict[str, object] = {}
    async with run_bridge(config, extra_plugins=[StuckPersist()]) as daemon:
        for i in ("m0", "m1", "m2"):
            await daemon.pipeline.submit(Message("memory", {}, "a", i),
                                         partial(outcomes.__setitem__, i))
            await trio.testing.wait_all_tasks_blocked()
        assert daemon.pipeline.pending == 3
    assert outcomes == {}


class Flaky(MemoryTransport):
    async def deliver(self, messages: Sequence[Message]) -> None:
        if any(m.body.get("refuse") for m in messages):
            raise DeliveryError("refused")
        await super().deliver(messages)


class FlakyPlugin:
    @hookimpl
    def bridge_register_transports(self, register: Callable[[TransportType], None]) -> None:
        register(TransportType("flaky", MemorySettings, Flaky))


async def test_destination_failure_affects_only_its_message(bridge_config: MakeConfig) -> None:
    config = bridge_config(TWO.replace('[transports.b]\ntype = "memory"',
                                       '[transports.b]\ntype = "flaky"'),
                           extra_plugins=[FlakyPlugin()])
    async with run_bridge(config) as daemon:
        bad = await mem(daemon, "a").inject({"refuse": True}, id="x")
        good = await mem(daemon, "a").inject({"n": 1}, id="y")
        assert (await mem(daemon, "b").received.receive()).id == "y"
    assert isinstance(bad, Failed)
    assert bad.reason == "delivery to b failed"
    assert isinstance(good, Accepted)


async def test_hop_limit_rejects(bridge_config: MakeConfig) -> None:
    config = bridge_config(TWO.replace("batch_max = 2", "batch_max = 2\nhop_limit = 3"))
    async with run_bridge(config) as daemon:
        ok = await mem(daemon, "a").inject({}, hops=3)
        over = await mem(daemon, "a").inject({}, hops=4)
    assert isinstance(ok, Accepted)
    assert isinstance(over, Rejected)
    assert isinstance(over.error, HopLimitExceeded)


async def test_blocked_destination_bounds_memory_and_pushes_back(bridge_config: MakeConfig
                                                                 ) -> None:
    # b holds 2, the pipeline queue 4, a batch 2 (two batches in the pipeline's hands): with
    # nobody reading b the source must block
    # after a bounded number of messages, and lose none once b is read again.
    total = 100
    injected = 0
    async with run_bridge(bridge_config(TWO)) as daemon:
        a, b = mem(daemon, "a"), mem(daemon, "b")

        async def producer() -> None:
            nonlocal injected
            for i in range(total):
                await a.inject({"n": i}, wait=False)
                injected += 1

        async with trio.open_nursery() as nursery:
            nursery.start_soon(producer)
            await trio.testing.wait_all_tasks_blocked()
            blocked_at = injected
            # capacity + queue + a batch being finished + a batch prepared + one in hand
            assert blocked_at < 2 + 4 + 2 + 2 + 2
            assert daemon.pipeline.pending <= 4 + 2 + 2 + 1
            received = [(await b.received.receive()).body["n"] for _ in range(total)]
    assert received == list(range(total))


async def test_drain_on_stop_delivers_everything_in_flight(bridge_config: MakeConfig) -> None:
    config = bridge_config(TWO.replace("capacity = 2", "capacity = 1000")
                           .replace("pipeline_queue = 4", "pipeline_queue = 1000"))
    async with run_bridge(config) as daemon:
        a, b = mem(daemon, "a"), mem(daemon, "b")
        for i in range(500):
            await a.inject({"n": i}, wait=False)
        assert daemon.pipeline.pending > 0  # still in flight when the drain starts
    # run_bridge has drained the daemon: every message delivered, in order
    received = []
    while True:
        try:
            received.append(b.received.receive_nowait().body["n"])
        except trio.WouldBlock:
            break
    assert received == list(range(500))
    assert daemon.pipeline.pending == 0


def test_misspelt_hook_fails_at_start() -> None:
    class Typo:
        @hookimpl
        def bridge_validat_message(self, message: Message) -> None:
            return None

    with pytest.raises(ConfigError, match="bridge_validat_message") as refused:
        build_plugin_manager(extra=[Typo()])
    assert isinstance(refused.value.__cause__, pluggy.PluginValidationError)


def test_disable_builtin(tmp_path: Any) -> None:
    pm = build_plugin_manager(disable=["memory"])
    assert pm.get_plugin("memory") is None
    assert pm.get_plugin("codecs") is not None


class BatchSizes:
    """Records how many messages each persist call (one per pipeline batch) carries."""

    def __init__(self) -> None:
        self.sizes: list[int] = []

    @hookimpl
    def bridge_persist_messages(self, messages: Sequence[Message]) -> None:
        self.sizes.append(len(messages))


async def test_a_burst_submitted_in_a_loop_is_one_batch(bridge_config: MakeConfig) -> None:
    """``submit`` returns without a scheduler pass while there is room, so the pipeline
    wakes once for the whole burst instead of for its first message alone."""
    sizes = BatchSizes()
    cfg = TWO.replace("pipeline_queue = 4", "pipeline_queue = 64").replace(
        "batch_max = 2", "batch_max = 64").replace("capacity = 2", "capacity = 64")
    async with run_bridge(bridge_config(cfg), extra_plugins=[sizes]) as daemon:
        for n in range(50):
            await mem(daemon, "a").inject({"n": n}, wait=False)
        with trio.fail_after(5):
            got = [await mem(daemon, "b").received.receive() for _ in range(50)]
    assert [m.body["n"] for m in got] == list(range(50))
    assert sizes.sizes == [50]
