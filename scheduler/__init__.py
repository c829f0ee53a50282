"""Pure-Python scheduling: sequences, the KV pager and the continuous-batching scheduler.

No torch, Redis or protobuf here, so all of it is unit-tested in milliseconds.
"""

from scheduler.batching import BATCHING_STRATEGIES, Batching
from scheduler.block_manager import RELEASED, Block, BlockManager
from scheduler.config import SchedulerConfig
from scheduler.output import SampledToken, ScheduledSeq, SchedulerOutput, TokenChunk
from scheduler.scheduler import Scheduler
from scheduler.sequence import FinishReason, SamplingParams, Sequence, SequenceStatus

__all__ = [
    "BATCHING_STRATEGIES",
    "RELEASED",
    "Batching",
    "Block",
    "BlockManager",
    "FinishReason",
    "SampledToken",
    "SamplingParams",
    "ScheduledSeq",
    "Scheduler",
    "SchedulerConfig",
    "SchedulerOutput",
    "Sequence",
    "SequenceStatus",
    "TokenChunk",
]
