"""The incremental detokenizer never splits a UTF-8 character and cuts stop strings."""

from pathlib import Path

import pytest

from tokenization import TextStream, Tokenizer


@pytest.fixture(scope="module")
def tokenizer(model_dir: Path) -> Tokenizer:
    return Tokenizer(model_dir)


def stream_one_by_one(
    tokenizer: Tokenizer, text: str, stop: tuple[str, ...] = ()
) -> tuple[list[str], TextStream]:
    stream = TextStream(tokenizer, stop)
    deltas = [stream.push([token]) for token in tokenizer.encode(text)]
    deltas.append(stream.flush())
    return deltas, stream


@pytest.mark.parametrize(
    "text", ["Party 🎉🎉 time 👩‍👩‍👧", "東京は日本の首都です。", "mixed: naïve café — 北京 🚀 done"]
)
def test_multibyte_characters_come_out_whole(tokenizer: Tokenizer, text: str) -> None:
    tokens = tokenizer.encode(text)
    assert any("\ufffd" in tokenizer.decode([t]) for t in tokens), (
        "the text should split characters across tokens"
    )
    deltas, _ = stream_one_by_one(tokenizer, text)
    assert "".join(deltas) == text
    assert all("\ufffd" not in delta for delta in deltas)


def test_stop_string_is_cut_with_everything_after_it(tokenizer: Tokenizer) -> None:
    deltas, stream = stream_one_by_one(tokenizer, "The answer is Paris. Then more text.", stop=("Paris.",))
    assert "".join(deltas) == "The answer is "
    assert stream.matched_stop == "Paris."


def test_text_that_only_begins_a_stop_string_is_released_at_the_end(tokenizer: Tokenizer) -> None:
    deltas, stream = stream_one_by_one(tokenizer, "It ends with Par", stop=("Paris",))
    assert "".join(deltas) == "It ends with Par"
    assert stream.matched_stop is None


def test_earliest_of_several_stop_strings_wins(tokenizer: Tokenizer) -> None:
    deltas, stream = stream_one_by_one(tokenizer, "one two three four", stop=("four", "two"))
    assert "".join(deltas) == "one "
    assert stream.matched_stop == "two"


def test_chat_template_opens_the_assistant_turn(tokenizer: Tokenizer) -> None:
    rendered = tokenizer.render_chat([{"role": "user", "content": "Hi"}])
    assert rendered.endswith("<|im_start|>assistant\n")
    assert "<|im_start|>user\nHi<|im_end|>" in rendered
