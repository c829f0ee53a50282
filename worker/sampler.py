"""Pick one token per row of logits, each row with its own sampling parameters.

Seeded rows draw their noise from a generator seeded with (seed, token index, choice), so a seeded
request gets the same tokens alone or in any batch, after preemption, and on another worker, and each
of its n choices has a stream of its own (choice 0's is that of the same request with n = 1).
"""

import os

import torch

from scheduler import SampledToken, ScheduledSeq

_MASK = float("-inf")


def _seed_for(seed: int, index: int, choice: int) -> int:
    return (seed * 6364136223846793005 + index * 1442695040888963407 + choice * 0x9E3779B97F4A7C15 + 1) % (
        1 << 63
    )


class Sampler:
    """Vectorized greedy / temperature / top-k / top-p / min-p sampling with penalties and logprobs."""

    def __init__(self, device: torch.device):
        self.device = device
        self._generator = torch.Generator(device=device)
        self._generator.manual_seed(int.from_bytes(os.urandom(8), "little") >> 1)
        self._seeded = torch.Generator(device=device)
        self._bit_shifts = torch.arange(32, dtype=torch.int32, device=device)

    def __call__(
        self, logits: torch.Tensor, items: list[ScheduledSeq], bitmask: torch.Tensor | None = None
    ) -> list[SampledToken]:
        """logits: [num_items, vocab_size] float32, row i belonging to items[i]; `bitmask`: the
        grammar masks of the step, one bit per token (see GrammarMatchers.masks)."""
        if bitmask is not None or any(
            item.sampling.allowed_token_ids or item.sampling.logit_bias for item in items
        ):
            logits = self._restrict(logits.clone(), items, bitmask)
        if any(item.history is not None for item in items):
            logits = self._apply_penalties(logits.clone(), items)
        if any(item.banned_token_ids for item in items):
            logits = logits.clone()
            for row, item in enumerate(items):
                if item.banned_token_ids:
                    logits[row, list(item.banned_token_ids)] = _MASK
        want_logprobs = any(item.sampling.logprobs is not None for item in items)
        greedy = [item.sampling.is_greedy for item in items]
        if all(greedy) and not want_logprobs:
            return [SampledToken(token) for token in logits.argmax(dim=-1).tolist()]
        temperatures = torch.tensor(
            [1.0 if g else item.sampling.temperature for g, item in zip(greedy, items, strict=True)],
            device=self.device,
        )
        scaled = logits / temperatures[:, None]
        tokens = scaled.argmax(dim=-1)
        if not all(greedy):
            sampled = self._sample(self._filter(scaled.clone(), items), items)
            tokens = torch.where(torch.tensor(greedy, device=self.device), tokens, sampled)
        token_ids = tokens.tolist()
        if not want_logprobs:
            return [SampledToken(token) for token in token_ids]
        return self._with_logprobs(torch.log_softmax(scaled, dim=-1), token_ids, items)

    def _restrict(
        self, logits: torch.Tensor, items: list[ScheduledSeq], bitmask: torch.Tensor | None
    ) -> torch.Tensor:
        """Grammar masks and allowed tokens first, then logit biases: what a row may sample at all."""
        vocab = logits.shape[1]
        if bitmask is not None:
            bits = (bitmask.to(logits.device).unsqueeze(-1) >> self._bit_shifts) & 1  # [rows, words, 32]
            logits = logits.masked_fill(bits.view(len(items), -1)[:, :vocab] == 0, _MASK)
        for row, item in enumerate(items):
            sampling = item.sampling
            if sampling.allowed_token_ids:
                allowed = torch.zeros(vocab, dtype=torch.bool, device=self.device)
                allowed[list(sampling.allowed_token_ids)] = True
                logits[row] = logits[row].masked_fill(~allowed, _MASK)
            if sampling.logit_bias:
                ids, biases = zip(*sampling.logit_bias, strict=True)
                logits[row, list(ids)] += torch.tensor(biases, dtype=logits.dtype, device=self.device)
        return logits

    def _apply_penalties(self, logits: torch.Tensor, items: list[ScheduledSeq]) -> torch.Tensor:
        for row, item in enumerate(items):
            if item.history is None:
                continue
            sampling = item.sampling
            if sampling.repetition_penalty != 1.0:
                seen = torch.tensor(sorted(set(item.history)), dtype=torch.long, device=self.device)
                values = logits[row, seen]
                penalty = sampling.repetition_penalty
                logits[row, seen] = torch.where(values > 0, values / penalty, values * penalty)
            output = item.history[item.num_prompt_tokens :]
            if output and (sampling.presence_penalty or sampling.frequency_penalty):
                counts = torch.bincount(
                    torch.tensor(output, dtype=torch.long, device=self.device), minlength=logits.shape[1]
                ).to(logits.dtype)
                logits[row] -= sampling.frequency_penalty * counts + sampling.presence_penalty * (counts > 0)
        return logits

    def _filter(self, logits: torch.Tensor, items: list[ScheduledSeq]) -> torch.Tensor:
        """Mask out tokens outside top-k, top-p and min-p, per row."""
        top_k = [item.sampling.top_k for item in items]
        top_p = [item.sampling.top_p for item in items]
        min_p = [item.sampling.min_p for item in items]
        vocab = logits.shape[1]
        if any(0 < k < vocab for k in top_k) or any(p < 1.0 for p in top_p):
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            ks = torch.tensor([k if 0 < k < vocab else vocab for k in top_k], device=self.device)
            ranks = torch.arange(vocab, device=self.device)[None, :]
            drop = ranks >= ks[:, None]
            probs = sorted_logits.masked_fill(drop, _MASK).softmax(dim=-1)
            mass_before = probs.cumsum(dim=-1) - probs
            drop |= mass_before > torch.tensor(top_p, device=self.device)[:, None]
            drop[:, 0] = False  # always keep the most likely token
            logits = logits.scatter(1, order, sorted_logits.masked_fill(drop, _MASK))
        if any(p > 0.0 for p in min_p):
            probs = logits.softmax(dim=-1)
            floor = torch.tensor(min_p, device=self.device)[:, None] * probs.max(dim=-1, keepdim=True).values
            logits = logits.masked_fill(probs < floor, _MASK)
        return logits

    def _sample(self, logits: torch.Tensor, items: list[ScheduledSeq]) -> torch.Tensor:
        """Exponential-race sampling: argmax(p / E) with E ~ Exp(1) picks token i with probability p_i."""
        probs = logits.softmax(dim=-1)
        noise = torch.empty_like(probs).exponential_(generator=self._generator)
        for row, item in enumerate(items):
            seed = item.sampling.seed
            if seed is not None and not item.sampling.is_greedy:
                self._seeded.manual_seed(_seed_for(seed, item.num_output_tokens, item.choice_index))
                noise[row].exponential_(generator=self._seeded)
        return (probs / noise).argmax(dim=-1)

    def _with_logprobs(
        self, logprobs: torch.Tensor, token_ids: list[int], items: list[ScheduledSeq]
    ) -> list[SampledToken]:
        results = []
        for row, (token, item) in enumerate(zip(token_ids, items, strict=True)):
            num_top = item.sampling.logprobs
            if num_top is None:
                results.append(SampledToken(token))
                continue
            top: tuple[tuple[int, float], ...] = ()
            if num_top:
                values, ids = logprobs[row].topk(num_top)
                top = tuple(zip(ids.tolist(), values.tolist(), strict=True))
            results.append(SampledToken(token, float(logprobs[row, token]), top))
        return results
