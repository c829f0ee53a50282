"""The KV pager: fixed-size blocks, a free list in eviction order, reference counts, prefix caching,
blocks shared by the choices of one prompt and copied when one of them writes into a shared one."""

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

from scheduler.sequence import Sequence


@dataclass(slots=True, eq=False)
class Block:
    """One KV block; `block_hash` is set while its full contents are registered in the prefix cache."""

    block_id: int
    ref_count: int = 0
    block_hash: bytes | None = None


def chain_hash(parent: bytes, token_ids: list[int]) -> bytes:
    """Key of a full block: its tokens and, through `parent`, every token before them."""
    return hashlib.blake2b(parent + array("I", token_ids).tobytes(), digest_size=16).digest()


# A block-table entry whose block was given back because no later query can see it (every layer
# attends through a sliding window that has moved past it). Its position in the table stays.
RELEASED = -1


class BlockManager:
    """Hands out KV blocks to sequences and keeps computed full blocks reusable by later prompts.

    A freed block with a hash keeps its contents: it stays findable by hash until it is
    reallocated. The free list is in eviction order, least recently freed first; blocks with no
    reusable contents go to the front so they are taken before cached ones.
    """

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_prefix_caching: bool = True,
        long_prompt_from: int | None = None,
    ):
        self.block_size = block_size
        self.long_prompt_from = long_prompt_from
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(block_id) for block_id in range(num_blocks)]
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._cached: dict[bytes, int] = {}  # block hash -> block id
        self.num_queried_tokens = 0  # tokens looked up in the prefix cache, over the pool's life
        self.num_hit_tokens = 0  # of those, tokens found computed
        self._copies: dict[int, int] = {}  # destination -> source: copies on write not yet made

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return len(self.blocks) - len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    def num_blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        total = seq.num_computed_tokens + num_new_tokens
        return max(0, -(-total // self.block_size) - len(seq.block_table))

    def match_prefix(self, seq: Sequence) -> int:
        """Give a sequence with no blocks the cached blocks of its longest cached prefix.

        At least one token is left uncomputed, so the step that finishes the prompt still runs
        the model and samples. Returns the number of tokens found computed.
        """
        assert not seq.block_table and seq.num_computed_tokens == 0
        if not self.enable_prefix_caching or seq.wants_prompt_logprobs:
            return 0  # prompt logprobs score every prompt token: none may be skipped
        max_blocks = (seq.num_tokens - 1) // self.block_size
        self.num_queried_tokens += seq.num_tokens
        self._hash_full_blocks(seq, max_blocks)
        for block_hash in seq.block_hashes[:max_blocks]:
            block_id = self._cached.get(block_hash)
            if block_id is None:
                break
            self._take(block_id)
            seq.block_table.append(block_id)
        num_hits = len(seq.block_table)
        seq.num_cached_blocks = num_hits
        seq.num_computed_tokens = num_hits * self.block_size
        self.num_hit_tokens += seq.num_computed_tokens
        return seq.num_computed_tokens

    def allocate_slots(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Grow the block table to hold `num_new_tokens` more tokens; False if blocks run out.

        The first new token may land in a partly filled block another choice still shares: the
        sequence then gets its own copy of it (copy on write), to be made before the step runs.
        """
        num_needed = self.num_blocks_needed(seq, num_new_tokens)
        shared = self._shared_partial_block(seq)
        if num_needed + (shared is not None) > len(self._free):
            return False
        if shared is not None:
            source = seq.block_table[shared]
            seq.block_table[shared] = self._allocate()
            self._copies[seq.block_table[shared]] = source
            self._release(source)
        for _ in range(num_needed):
            seq.block_table.append(self._allocate())
        return True

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """Give `child` every block `parent` holds, shared: written by neither until copied."""
        child.block_table = list(parent.block_table)
        for block_id in parent.block_table[parent.num_released_blocks :]:
            self.blocks[block_id].ref_count += 1
        child.num_computed_tokens = parent.num_computed_tokens
        child.num_cached_blocks = parent.num_cached_blocks
        child.num_released_blocks = parent.num_released_blocks
        child.block_hashes = list(parent.block_hashes)

    def take_copies(self) -> tuple[tuple[int, int], ...]:
        """The (source, destination) block copies due before the next step, once."""
        copies = tuple((source, destination) for destination, source in self._copies.items())
        self._copies.clear()
        return copies

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Register the sequence's newly computed full blocks so later prompts can reuse them."""
        if not self.enable_prefix_caching:
            return
        num_full = seq.num_computed_tokens // self.block_size
        if num_full <= seq.num_cached_blocks:
            return
        self._hash_full_blocks(seq, num_full)
        for index in range(seq.num_cached_blocks, num_full):
            block_hash = seq.block_hashes[index]
            if block_hash not in self._cached:  # else another block already holds these tokens
                block = self.blocks[seq.block_table[index]]
                block.block_hash = block_hash
                self._cached[block_hash] = block.block_id
        seq.num_cached_blocks = num_full

    def free(self, seq: Sequence) -> None:
        """Release the sequence's blocks; tail blocks first, so shared prefixes are evicted last."""
        for block_id in reversed(seq.block_table):
            if block_id != RELEASED:
                self._release(block_id)
        seq.block_table.clear()
        seq.num_cached_blocks = 0
        seq.num_released_blocks = 0

    def release_outside_window(self, seq: Sequence, window: int) -> None:
        """Give back the blocks no later query of `seq` sees: the next query is at position
        num_computed_tokens and sees keys after it minus `window`. Their contents stay cached."""
        first_visible = seq.num_computed_tokens - window + 1
        num_outside = max(0, first_visible) // self.block_size
        for index in range(seq.num_released_blocks, num_outside):
            self._release(seq.block_table[index])
            seq.block_table[index] = RELEASED
        seq.num_released_blocks = max(seq.num_released_blocks, num_outside)

    def check_invariants(self, seqs: Iterable[Sequence]) -> None:
        """Assert the pool is consistent with the block tables of `seqs` (all live sequences)."""
        expected = [0] * len(self.blocks)
        for seq in seqs:
            assert all(b == RELEASED for b in seq.block_table[: seq.num_released_blocks])
            for block_id in seq.block_table[seq.num_released_blocks :]:
                expected[block_id] += 1
        for block in self.blocks:
            assert block.ref_count == expected[block.block_id], (
                f"block {block.block_id}: ref_count {block.ref_count} != {expected[block.block_id]}"
            )
            assert (block.ref_count == 0) == (block.block_id in self._free), (
                f"block {block.block_id}: ref_count {block.ref_count} but free={block.block_id in self._free}"
            )
        used = sum(1 for block in self.blocks if block.ref_count > 0)
        assert used + len(self._free) == len(self.blocks), "free + used != total"
        for block_hash, block_id in self._cached.items():
            assert self.blocks[block_id].block_hash == block_hash, f"block {block_id}: stale hash"

    def _allocate(self) -> int:
        block_id, _ = self._free.popitem(last=False)
        block = self.blocks[block_id]
        if block.block_hash is not None:  # evict its old contents
            del self._cached[block.block_hash]
            block.block_hash = None
        block.ref_count = 1
        return block_id

    def _shared_partial_block(self, seq: Sequence) -> int | None:
        """The index in the table of the block the next token goes into, when it is partly filled
        and shared with another sequence; None otherwise."""
        index, offset = divmod(seq.num_computed_tokens, self.block_size)
        if offset == 0 or index >= len(seq.block_table):
            return None
        return index if self.blocks[seq.block_table[index]].ref_count > 1 else None

    def _release(self, block_id: int) -> None:
        block = self.blocks[block_id]
        block.ref_count -= 1
        if block.ref_count == 0:
            self._free[block_id] = None
            if block.block_hash is None:
                self._free.move_to_end(block_id, last=False)

    def _take(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self._free[block_id]
        block.ref_count += 1

    def _root(self, seq: Sequence) -> bytes:
        """The start of a sequence's hash chain: prompts whose KV differs for the same tokens differ here."""
        if self.long_prompt_from is not None and seq.num_prompt_tokens > self.long_prompt_from:
            return b"long-prompt"
        return b""

    def _hash_full_blocks(self, seq: Sequence, num_blocks: int) -> None:
        size = self.block_size
        for index in range(len(seq.block_hashes), num_blocks):
            parent = seq.block_hashes[-1] if seq.block_hashes else self._root(seq)
            tokens = seq.token_slice(index * size, (index + 1) * size)
            seq.block_hashes.append(chain_hash(parent, tokens))
