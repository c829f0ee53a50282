"""stop_task ends a background loop even when the loop swallows the first cancellation."""

import asyncio

from gateway.background import stop_task


def test_a_loop_that_swallows_a_cancel_is_still_stopped() -> None:
    swallowed: list[int] = []

    async def stubborn_loop() -> None:
        while True:  # as a retry loop that took a cancelled Redis call for a connection error
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                if swallowed:
                    raise
                swallowed.append(1)

    async def run() -> asyncio.Task[None]:
        task = asyncio.create_task(stubborn_loop(), name="stubborn")
        await asyncio.sleep(0.01)
        await asyncio.wait_for(stop_task(task), timeout=5)
        return task

    task = asyncio.run(run())
    assert swallowed == [1] and task.cancelled()


def test_a_task_that_already_failed_is_reported_not_raised() -> None:
    async def broken() -> None:
        raise RuntimeError("boom")

    async def run() -> asyncio.Task[None]:
        task = asyncio.create_task(broken())
        await asyncio.sleep(0.01)
        await stop_task(task)
        return task

    assert isinstance(asyncio.run(run()).exception(), RuntimeError)
