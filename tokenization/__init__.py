"""Tokenizing and incremental detokenizing without torch, shared by the gateway and the worker."""

from tokenization.text_stream import TextStream
from tokenization.tokenizer import Tokenizer

__all__ = ["TextStream", "Tokenizer"]
