"""stop_task: ending a gateway background loop for sure, so shutdown cannot hang on it."""

import asyncio
import contextlib
import logging

logger = logging.getLogger(__name__)

_RECANCEL_S = 1.0


async def stop_task(task: asyncio.Task[None]) -> None:
    """Cancel the task and wait until it has ended. A loop that catches its library's errors and
    retries can swallow a cancellation (a Redis call that turns it into a connection error, or a
    timeout that fires at the same moment): it is cancelled again every second until it ends."""
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=_RECANCEL_S)
        if not task.done():
            logger.warning("%s survived a cancel; cancelling it again", task.get_name())
    with contextlib.suppress(asyncio.CancelledError):
        error = task.exception()
        if error is not None:
            logger.error("%s had failed: %r", task.get_name(), error)
