"""Tokenizers and chat templates for the light processes (api workers, tokenizers, detokenizers).

Nothing in this package imports Paddle.
"""
from fastdeploy.input.tokenizer import Tokenizer, TokenizerBackend, load_tokenizer

__all__ = ["Tokenizer", "TokenizerBackend", "load_tokenizer"]
