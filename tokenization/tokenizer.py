"""Tokenizer: a checkpoint's tokenizer.json and chat template, loaded with `tokenizers` and jinja2."""

import functools
import json
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):
        return str(value.get("content"))
    return value if isinstance(value, str) else None


def _raise(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


class Tokenizer:
    """Encodes prompts and chats exactly as Hugging Face's tokenizer for the same checkpoint does."""

    def __init__(self, model_dir: Path):
        self._tokenizer = tokenizers.Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        # Lengths are checked (or cut, when asked) by the caller against the model's limit; a
        # tokenizer.json that pads or truncates on its own (sentence-transformers' do) would hide that.
        self._tokenizer.no_truncation()
        self._tokenizer.no_padding()
        config_path = model_dir / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.exists() else {}
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token"))
        template = config.get("chat_template")
        template_path = model_dir / "chat_template.jinja"
        if template is None and template_path.exists():
            template = template_path.read_text()
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        self._chat_template = env.from_string(template) if isinstance(template, str) else None

    @property
    def vocab_size(self) -> int:
        return int(self._tokenizer.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str) -> list[int]:
        """Raw text, with the special tokens the checkpoint's post-processor adds."""
        return list(self._tokenizer.encode(text, add_special_tokens=True).ids)

    def encode_many(self, texts: Sequence[str], truncate_to: int | None = None) -> list[list[int]]:
        """Texts in one batch, with special tokens; with `truncate_to`, cut to at most that many
        tokens as Hugging Face's truncation does (the special tokens kept, the text's end dropped)."""
        encodings = self._tokenizer.encode_batch(list(texts), add_special_tokens=False)
        num_special = self._tokenizer.num_special_tokens_to_add(False)
        result = []
        for encoding in encodings:
            if truncate_to is not None and len(encoding.ids) + num_special > truncate_to:
                encoding.truncate(max(truncate_to - num_special, 0))
            result.append(list(self._tokenizer.post_process(encoding).ids))
        return result

    def render_chat(self, messages: Sequence[dict[str, str]]) -> str:
        """The chat template applied, with the assistant turn opened."""
        if self._chat_template is None:
            raise ValueError("this model has no chat template; send a raw prompt or token ids")
        try:
            return self._chat_template.render(
                messages=list(messages),
                add_generation_prompt=True,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
            )
        except jinja2.exceptions.TemplateError as error:
            raise ValueError(f"the chat template refused these messages: {error}") from error

    def encode_chat(self, messages: Sequence[dict[str, str]]) -> list[int]:
        return list(self._tokenizer.encode(self.render_chat(messages), add_special_tokens=False).ids)

    @functools.lru_cache(maxsize=1 << 16)  # noqa: B019 - a tokenizer lives as long as its process
    def token_text(self, token_id: int) -> str:
        """One token as text, special tokens included: what logprobs name a token by."""
        return str(self._tokenizer.decode([token_id], skip_special_tokens=False))

    def decode(self, token_ids: Sequence[int]) -> str:
        return str(self._tokenizer.decode(list(token_ids), skip_special_tokens=True))
