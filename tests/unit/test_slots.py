"""queue/slots.py: deliveries per destination within a process."""

from __future__ import annotations

import asyncio
import contextlib

from postroom.queue.slots import ProcessSlots


async def _hold(slots: ProcessSlots, limit: int, running: list[int], go: asyncio.Event) -> None:
    async with slots.slot("d.test", limit):
        running.append(1)
        await go.wait()
        running.pop()


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def _backlog(
    slots: ProcessSlots, limit: int, count: int, running: list[int], go: asyncio.Event
) -> list[asyncio.Task[None]]:
    """``count`` deliveries asking for a slot under ``limit``, as far as they get."""
    tasks = [asyncio.create_task(_hold(slots, limit, running, go)) for _ in range(count)]
    await _settle()
    return tasks


def test_at_most_limit_at_once_and_forgotten_when_idle() -> None:
    async def main() -> None:
        slots, running, go = ProcessSlots(), [], asyncio.Event()
        tasks = await _backlog(slots, 2, 5, running, go)
        assert len(running) == 2
        go.set()
        await asyncio.gather(*tasks)
        assert not slots._destinations  # (nothing kept for a domain with nothing under way)

    asyncio.run(main())


def test_a_reload_applies_to_the_deliveries_waiting_already() -> None:
    """Two probes: the limit of a domain's first delivery was kept until a restart, and then
    a delivery waiting already kept the limit it came with."""

    async def main() -> None:
        slots, running, go = ProcessSlots(), [], asyncio.Event()
        first = await _backlog(slots, 2, 6, running, go)
        assert len(running) == 2
        slots.relimit(5)  # raised: those waiting go on at once
        await _settle()
        assert len(running) == 5
        slots.relimit(1)  # lowered with one still waiting: it goes once the rest are done
        go.set()
        await asyncio.gather(*first)
        # A new limit on a delivery's own call holds for the domain as well.
        go = asyncio.Event()
        held = await _backlog(slots, 3, 3, running, go)
        lower = await _backlog(slots, 2, 4, running, go)
        assert len(running) == 3
        go.set()
        await asyncio.gather(*held, *lower)

    asyncio.run(main())


def test_a_limit_raised_by_a_new_delivery_lets_those_waiting_go_first() -> None:
    async def main() -> None:
        slots, running, go = ProcessSlots(), [], asyncio.Event()
        first = await _backlog(slots, 1, 3, running, go)
        assert len(running) == 1
        later = asyncio.create_task(_hold(slots, 4, running, go))  # (a reload before it)
        await _settle()
        assert len(running) == 4
        go.set()
        await asyncio.gather(*first, later)

    asyncio.run(main())


def test_a_freed_slot_goes_to_the_one_that_waited_longest() -> None:
    """A probe: a delivery arriving as a slot was freed took it before those woken for it."""

    async def main() -> None:
        slots, order = ProcessSlots(), []
        gates = [asyncio.Event() for _ in range(4)]

        async def deliver(i: int) -> None:
            async with slots.slot("d.test", 1):
                order.append(i)
                await gates[i].wait()

        tasks = [asyncio.create_task(deliver(i)) for i in range(3)]
        await _settle()
        gates[0].set()
        await asyncio.sleep(0)  # 0 leaves and hands its slot to 1...
        tasks.append(asyncio.create_task(deliver(3)))  # ...before 3 arrives
        for gate in gates:
            gate.set()
        await asyncio.gather(*tasks)
        assert order == [0, 1, 2, 3]

    asyncio.run(main())


def test_a_waiter_cancelled_after_its_wake_passes_the_slot_on() -> None:
    async def main() -> None:
        slots, running, go = ProcessSlots(), [], asyncio.Event()
        go.set()
        held = slots.slot("d.test", 1)
        await held.__aenter__()
        woken = asyncio.create_task(_hold(slots, 1, running, go))
        after = asyncio.create_task(_hold(slots, 1, running, go))
        await _settle()
        assert len(slots._destinations["d.test"].waiting) == 2
        await held.__aexit__(None, None, None)  # wakes ``woken``, which is cancelled
        woken.cancel()  # before it ran: ``after`` must get the slot
        with contextlib.suppress(asyncio.CancelledError):
            await woken
        await asyncio.wait_for(after, 2)
        assert not slots._destinations

    asyncio.run(main())


def test_a_cancelled_waiter_a_release_dropped_already_ends_quietly() -> None:
    """A re-probe: a stop cancelled the deliveries waiting; a release dropped their futures
    from the line before they ran, and each then failed to remove itself (a ValueError in
    place of the cancellation, logged as a delivery error)."""

    async def main() -> None:
        slots, running, go = ProcessSlots(), [], asyncio.Event()
        held = slots.slot("d.test", 1)
        await held.__aenter__()
        waiters = await _backlog(slots, 1, 3, running, go)
        for task in waiters:
            task.cancel()  # their futures are cancelled now; the tasks have not run yet
        await held.__aexit__(None, None, None)  # the release drops the cancelled futures
        results = await asyncio.gather(*waiters, return_exceptions=True)
        assert all(isinstance(r, asyncio.CancelledError) for r in results), results
        assert not slots._destinations

    asyncio.run(main())
