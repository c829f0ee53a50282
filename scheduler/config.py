"""SchedulerConfig: the limits the scheduler and the KV pager work within."""

from dataclasses import dataclass

from scheduler.batching import BATCHING_STRATEGIES, Batching


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    """Sizes and budgets for one worker's scheduler; built by the worker's settings."""

    num_blocks: int  # KV blocks in the pool
    max_model_len: int  # context limit, prompt and completion together
    block_size: int = 16  # tokens per KV block
    max_num_seqs: int = 64  # sequences running at once
    max_num_batched_tokens: int = 512  # token budget per step
    enable_prefix_caching: bool = True
    eos_token_ids: tuple[int, ...] = ()  # end generation unless ignore_eos
    # A prompt longer than this gets other KV for the same tokens (LongRoPE's long factors), so its
    # blocks are cached apart from shorter prompts'; None: KV depends on the tokens only.
    long_prompt_from: int | None = None
    # When every layer attends through this sliding window, blocks that fall behind it are given
    # back as sequences advance; None: every block is kept until its sequence ends.
    sliding_window: int | None = None
    batching: Batching = "continuous"  # who may join the running batch: see scheduler/batching.py
    # Prompt-lookup speculative decoding: up to this many drafted tokens checked per decode (0: off),
    # taken after the longest recurring suffix of prompt_lookup_min to prompt_lookup_max tokens.
    num_speculative_tokens: int = 0
    prompt_lookup_min: int = 2
    prompt_lookup_max: int = 4

    def __post_init__(self) -> None:
        if self.batching not in BATCHING_STRATEGIES:
            raise ValueError(
                f"batching must be one of {', '.join(BATCHING_STRATEGIES)}, got {self.batching!r}"
            )
        for name in ("num_blocks", "max_model_len", "block_size", "max_num_seqs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.num_speculative_tokens < 0:
            raise ValueError(f"num_speculative_tokens must be at least 0, got {self.num_speculative_tokens}")
        if not 1 <= self.prompt_lookup_min <= self.prompt_lookup_max:
            raise ValueError(
                "prompt_lookup_min and prompt_lookup_max must satisfy 1 <= min <= max, got "
                f"{self.prompt_lookup_min} and {self.prompt_lookup_max}"
            )
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(
                "max_num_batched_tokens must be at least max_num_seqs so every running "
                f"sequence can decode each step ({self.max_num_batched_tokens} < {self.max_num_seqs})"
            )
        if self.num_blocks < self.max_blocks_per_seq:
            raise ValueError(
                f"{self.num_blocks} KV blocks cannot hold one sequence of max_model_len "
                f"{self.max_model_len} ({self.max_blocks_per_seq} blocks of {self.block_size})"
            )

    @property
    def max_blocks_per_seq(self) -> int:
        return -(-self.max_model_len // self.block_size)
