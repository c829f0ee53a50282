"""GrammarMatchers: one llguidance matcher per constrained sequence, and the token masks of a step.

A matcher is fed the sequence's output tokens by catching up with its history at each step, so a
resumed job (whose delivered tokens arrive as output) and a preempted one (whose outputs are kept)
rebuild the same state with no special path. Grammars compile once per worker, cached by their
text; the tokenizer llguidance needs (about a second to build) is built at the first constrained job.
"""

import functools
from collections import OrderedDict
from pathlib import Path

import llguidance
import tokenizers
import torch

from scheduler import ScheduledSeq

_MAX_CACHED_GRAMMARS = 256


class GrammarMatchers:
    def __init__(self, tokenizer_dir: Path, vocab_size: int, eos_token_ids: tuple[int, ...]):
        self._tokenizer_dir = tokenizer_dir
        self.vocab_size = vocab_size
        self._eos_token_ids = list(eos_token_ids)
        # By (request id, choice): the matcher, with how many tokens it took.
        self._matchers: dict[tuple[str, int], tuple[llguidance.LLMatcher, int]] = {}
        self._grammars: OrderedDict[str, llguidance.LLMatcher] = OrderedDict()  # fresh matchers to copy
        self._executor: llguidance.LLExecutor | None = None

    @functools.cached_property
    def tokenizer(self) -> llguidance.LLTokenizer:
        backend = tokenizers.Tokenizer.from_file(str(self._tokenizer_dir / "tokenizer.json"))
        backend.no_padding()
        backend.no_truncation()
        return llguidance.LLTokenizer(
            backend.to_str(), n_vocab=self.vocab_size, eos_token=self._eos_token_ids or None
        )

    def masks(self, items: list[ScheduledSeq]) -> torch.Tensor | None:
        """[len(items), ceil(vocab_size / 32)] int32 bitmask rows (all ones for a free row) after each
        constrained item's matcher caught up with its output; None when no item is constrained."""
        rows = [(row, item) for row, item in enumerate(items) if item.sampling.grammar]
        if not rows:
            return None
        bitmask = torch.full((len(items), -(-self.vocab_size // 32)), -1, dtype=torch.int32)
        matchers = [(self._caught_up(item), row) for row, item in rows]
        if self._executor is None:
            self._executor = llguidance.LLExecutor()
        # What llguidance.torch's fill_next_token_bitmask_par does; that module is not imported,
        # as it compiles a kernel at import (torch._dynamo and inductor: 3 s of every worker start).
        self._executor.unsafe_compute_mask_ptr(matchers, bitmask.data_ptr(), bitmask.shape[1] * 4, len(items))
        return bitmask

    def error_of(self, grammar: str) -> str:
        """Why `grammar` cannot be matched with this tokenizer ("" when it can): the gateway compiles
        grammars without one, so a special token or token id the vocabulary lacks shows only here."""
        template = self._template(grammar)
        return template.get_error() if template.is_error() else ""

    def __len__(self) -> int:
        """Sequences holding a matcher now."""
        return len(self._matchers)

    def drop(self, request_id: str, choice_index: int) -> None:
        self._matchers.pop((request_id, choice_index), None)

    def _caught_up(self, item: ScheduledSeq) -> llguidance.LLMatcher:
        key = (item.request_id, item.choice_index)
        matcher, consumed = self._matchers.get(key) or (self._fresh(item.sampling.grammar), 0)
        assert item.history is not None, "a constrained sequence is scheduled with its history"
        new = item.history[item.num_prompt_tokens + consumed :]
        if new:
            matcher.consume_tokens(new)
        self._matchers[key] = (matcher, consumed + len(new))
        return matcher

    def _fresh(self, grammar: str) -> llguidance.LLMatcher:
        return self._template(grammar).deep_copy()

    def _template(self, grammar: str) -> llguidance.LLMatcher:
        template = self._grammars.get(grammar)
        if template is None:
            template = llguidance.LLMatcher(self.tokenizer, grammar, log_level=0)
            self._grammars[grammar] = template
            if len(self._grammars) > _MAX_CACHED_GRAMMARS:
                self._grammars.popitem(last=False)
        else:
            self._grammars.move_to_end(grammar)
        return template
