"""ModelRunner: turn a SchedulerOutput into tensors, run one forward pass, sample."""

import dataclasses
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from scheduler import SampledToken, ScheduledSeq, SchedulerOutput
from worker.attention import AttentionBackend, SequenceRows
from worker.grammar_matchers import GrammarMatchers
from worker.kv_cache import KVCache
from worker.model import CausalLM
from worker.sampler import Sampler

if TYPE_CHECKING:
    from worker.cuda_graphs import DecodeGraphs


@dataclass(frozen=True, slots=True)
class StepResult:
    # by item: a token for each of its sample_choices, or with drafts, for each of its rows
    sampled: list[tuple[SampledToken, ...]]
    prompt_logprobs: dict[int, list[SampledToken]]  # by item: its chunk's prompt tokens scored


class ModelRunner:
    """Executes scheduler steps on one device; the only owner of the model and the KV tensors."""

    def __init__(
        self,
        model: CausalLM,
        kv_cache: KVCache,
        device: torch.device,
        attention: AttentionBackend,
        matchers: GrammarMatchers | None = None,
    ):
        self.model = model
        self.matchers = matchers
        # On a GPU, grammar masks are computed while the forward runs (llguidance and torch both let
        # go of the GIL). On a CPU the forward already has every core: a mask thread beside it stalls
        # torch's threads (a third slower steps, measured), so masks are computed before it instead.
        self._mask_thread = (
            ThreadPoolExecutor(1, thread_name_prefix="grammar-masks") if device.type == "cuda" else None
        )
        self.attention = attention
        self.graphs: DecodeGraphs | None = None  # set once captured (CUDA)
        self.kv_cache = kv_cache
        self.block_size = kv_cache.block_size
        self.device = device
        self.sampler = Sampler(device)
        self.model_s = 0.0  # time inside the model's forward, over the runner's life

    def execute(self, output: SchedulerOutput) -> StepResult:
        """One forward pass over every scheduled token; a token for each item that needs one, and
        the prompt logprobs of the chunks that asked for them."""
        items = output.scheduled
        # A decode, and each draft after it, is a query row of its own over the cache read in place.
        decodes = [i for i, item in enumerate(items) if item.num_new_tokens == 1 or item.num_draft_tokens]
        chunks = [i for i, item in enumerate(items) if item.num_new_tokens > 1 and not item.num_draft_tokens]
        order = decodes + chunks  # decodes occupy the first rows of the packed batch
        input_ids: list[int] = []
        positions: list[int] = []
        prompt_lens: list[int] = []
        slot_mapping: list[int] = []
        logit_rows: list[int] = []
        sampled_items: list[int] = []  # by logit row: its item
        sampled: list[ScheduledSeq] = []  # by logit row: the item as the choice sampled there
        prompt_rows: list[int] = []  # rows whose logits score the next prompt token
        prompt_targets: list[tuple[int, int]] = []  # (item, that token) of each
        seqs: list[SequenceRows] = []
        for index in order:
            item = items[index]
            seqs.append(
                SequenceRows(
                    item.block_ids,
                    item.start_pos,
                    item.num_new_tokens,
                    len(input_ids),
                    item.num_draft_tokens > 0,
                )
            )
            # Asked for and not yet sent (they go with completion token 0): this chunk's prompt
            # positions, each scoring the prompt token after it.
            if item.sampling.prompt_logprobs is not None and not item.num_output_tokens:
                assert item.history is not None, "a prompt that wants logprobs is scheduled with it"
                last = min(item.context_len, item.num_prompt_tokens - 1)
                prompt_rows.extend(range(len(input_ids), len(input_ids) + last - item.start_pos))
                prompt_targets.extend((index, token) for token in item.history[item.start_pos + 1 : last + 1])
            input_ids.extend(item.token_ids)
            prompt_lens.extend([item.num_prompt_tokens] * item.num_new_tokens)
            for pos in range(item.start_pos, item.context_len):
                positions.append(pos)
                slot_mapping.append(
                    item.block_ids[pos // self.block_size] * self.block_size + pos % self.block_size
                )
            for row in range(len(input_ids) - 1 - item.num_draft_tokens, len(input_ids) - 1):
                logit_rows.append(row)  # the rows fed a draft's predecessor check that draft
                sampled_items.append(index)
                sampled.append(item)
            for choice in item.sample_choices:  # choices forking off sample the same row
                logit_rows.append(len(input_ids) - 1)
                sampled_items.append(index)
                sampled.append(
                    item if choice == item.choice_index else dataclasses.replace(item, choice_index=choice)
                )
        masks: torch.Tensor | None = None
        pending_masks: Future[torch.Tensor | None] | None = None
        if self.matchers is not None and any(item.sampling.grammar for item in sampled):
            if self._mask_thread is not None:
                pending_masks = self._mask_thread.submit(self.matchers.masks, sampled)
            else:
                masks = self.matchers.masks(sampled)
        started = time.perf_counter()
        if output.block_copies:
            self.kv_cache.copy_blocks(output.block_copies)
        graph_size = (  # a step of decodes only, one row each, may replay a captured graph
            self.graphs.size_for(len(seqs))
            if self.graphs is not None and not prompt_rows and len(seqs) == len(input_ids)
            else None
        )
        if graph_size is not None:
            assert self.graphs is not None
            logits = self.graphs.run(graph_size, seqs, input_ids, positions, prompt_lens, slot_mapping)
            # row i is decode i: a view, unless a row is sampled for several choices (or none)
            in_order = logit_rows == list(range(len(seqs)))
            logits = logits[: len(seqs)] if in_order else logits[self._tensor(logit_rows)]
        else:
            logits = self.model(
                self._tensor(input_ids),
                self._tensor(positions),
                self.kv_cache,
                self.attention.plan(seqs, slot_mapping),
                self._tensor(logit_rows + prompt_rows),
                self._tensor(prompt_lens),
            )
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.model_s += time.perf_counter() - started
        results: list[tuple[SampledToken, ...]] = [()] * len(items)
        if sampled:
            if pending_masks is not None:
                masks = pending_masks.result()
            tokens = self.sampler(logits[: len(sampled)].float(), sampled, masks)
            for index, token in zip(sampled_items, tokens, strict=True):
                results[index] += (token,)
        return StepResult(results, self._prompt_logprobs(logits[len(sampled) :], prompt_targets, items))

    @staticmethod
    def _prompt_logprobs(
        logits: torch.Tensor, targets: list[tuple[int, int]], items: list[ScheduledSeq]
    ) -> dict[int, list[SampledToken]]:
        """Each prompt token's logprob under the raw distribution (no temperature, no penalties, as
        vLLM gives them) and the most likely tokens there, by item."""
        found: dict[int, list[SampledToken]] = {}
        if not targets:
            return found
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        tokens = torch.tensor([token for _, token in targets], device=logprobs.device)
        chosen = logprobs.gather(1, tokens[:, None]).squeeze(1).tolist()  # one copy for all rows
        most = max(items[index].sampling.prompt_logprobs or 0 for index, _ in targets)
        top_values, top_ids = (v.tolist() for v in logprobs.topk(most, dim=-1)) if most else ([], [])
        for row, (index, token) in enumerate(targets):
            num_top = items[index].sampling.prompt_logprobs or 0
            top = (
                tuple(zip(top_ids[row][:num_top], top_values[row][:num_top], strict=True)) if num_top else ()
            )
            found.setdefault(index, []).append(SampledToken(token, chosen[row], top))
        return found

    def _tensor(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)
