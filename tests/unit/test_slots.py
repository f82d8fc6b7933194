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


def test_at_most_limit_at_once_and_forgotten_when_idle() -> None:
    async def main() -> None:
        slots, running, go = ProcessSlots(), [], asyncio.Event()
        tasks = [asyncio.create_task(_hold(slots, 2, running, go)) for _ in range(5)]
        await _settle()
        assert len(running) == 2
        go.set()
        await asyncio.gather(*tasks)
        assert not slots._destinations  # (nothing kept for a domain with nothing under way)

    asyncio.run(main())


def test_a_reload_applies_to_a_domain_that_has_had_mail() -> None:
    """An obs probe: the limit of a domain's first delivery was kept until a restart."""

    async def main() -> None:
        slots, running, go = ProcessSlots(), [], asyncio.Event()
        first = [asyncio.create_task(_hold(slots, 2, running, go)) for _ in range(6)]
        await _settle()
        assert len(running) == 2
        # Raised: one more delivery with the new limit lets those waiting on at once.
        more = asyncio.create_task(_hold(slots, 10, running, go))
        await _settle()
        assert len(running) == 7
        go.set()
        await asyncio.gather(*first, more)
        # Lowered: at most the new limit, though the domain is still known.
        go = asyncio.Event()
        held = asyncio.create_task(_hold(slots, 10, running, go))
        await _settle()
        lower = [asyncio.create_task(_hold(slots, 2, running, go)) for _ in range(4)]
        await _settle()
        assert len(running) == 2
        go.set()
        await asyncio.gather(held, *lower)

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
