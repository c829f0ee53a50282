"""Response frames become OpenAI objects: chat completions and text completions, whole or as
server-sent chunks, with logprobs in each endpoint's own shape, and usage."""

import time
from dataclasses import dataclass, field
from typing import Any

from protos import inference_pb2
from tokenization import Tokenizer

MIN_LOGPROB = -9999.0  # what a token the sampler may not pick (-inf) is reported as, as vLLM does
FINISH_REASONS = {
    inference_pb2.FINISH_REASON_STOP: "stop",
    inference_pb2.FINISH_REASON_LENGTH: "length",
    inference_pb2.FINISH_REASON_CANCELLED: "abort",
}


@dataclass(slots=True)
class ChoiceText:
    """One choice, accumulated for a response that is not streamed."""

    text: str = ""
    logprobs: list[inference_pb2.TokenLogprobs] = field(default_factory=list)
    finish_reason: str | None = None


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


@dataclass(frozen=True, slots=True)
class Shape:
    """What every object of one response shares."""

    id: str
    model: str
    chat: bool  # /v1/chat/completions, else /v1/completions
    created: int = field(default_factory=lambda: int(time.time()))

    def _object(self, kind: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": kind,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }

    def whole(self, choices: list[ChoiceText], tokenizer: Tokenizer, used: dict[str, int]) -> dict[str, Any]:
        items = []
        for index, choice in enumerate(choices):
            item: dict[str, Any] = {"index": index, "finish_reason": choice.finish_reason}
            if self.chat:
                item["message"] = {"role": "assistant", "content": choice.text}
            else:
                item["text"] = choice.text
            item["logprobs"] = self.logprobs(choice.logprobs, tokenizer) if choice.logprobs else None
            items.append(item)
        return {**self._object("chat.completion" if self.chat else "text_completion", items), "usage": used}

    def chunk(
        self,
        index: int,
        text: str,
        logprobs: list[inference_pb2.TokenLogprobs],
        finish_reason: str | None,
        tokenizer: Tokenizer,
        first: bool,
        text_offset: int = 0,
    ) -> dict[str, Any]:
        """One choice's chunk of a stream; `text_offset`: characters of the choice sent before it."""
        item: dict[str, Any] = {"index": index, "finish_reason": finish_reason}
        if self.chat:
            item["delta"] = {"role": "assistant", "content": text} if first else {"content": text}
        else:
            item["text"] = text
        item["logprobs"] = self.logprobs(logprobs, tokenizer, text_offset) if logprobs else None
        return self._object("chat.completion.chunk" if self.chat else "text_completion", [item])

    def usage_chunk(self, used: dict[str, int]) -> dict[str, Any]:
        return {
            **self._object("chat.completion.chunk" if self.chat else "text_completion", []),
            "usage": used,
        }

    def logprobs(
        self, tokens: list[inference_pb2.TokenLogprobs], tokenizer: Tokenizer, text_offset: int = 0
    ) -> dict[str, Any]:
        if self.chat:
            return {"content": [_chat_logprob(t, tokenizer) for t in tokens]}
        texts = [tokenizer.token_text(t.token_id) for t in tokens]
        offsets, offset = [], text_offset
        for text in texts:
            offsets.append(offset)
            offset += len(text)
        return {
            "tokens": texts,
            "token_logprobs": [_finite(t.logprob) for t in tokens],
            "top_logprobs": [
                {tokenizer.token_text(a.token_id): _finite(a.logprob) for a in t.top} for t in tokens
            ],
            "text_offset": offsets,
        }


def _chat_logprob(token: inference_pb2.TokenLogprobs, tokenizer: Tokenizer) -> dict[str, Any]:
    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        text = tokenizer.token_text(token_id)
        return {"token": text, "logprob": _finite(logprob), "bytes": list(text.encode())}

    return {
        **entry(token.token_id, token.logprob),
        "top_logprobs": [entry(alt.token_id, alt.logprob) for alt in token.top],
    }


def _finite(logprob: float) -> float:
    return max(logprob, MIN_LOGPROB)
