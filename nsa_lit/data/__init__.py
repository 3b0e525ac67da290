"""Data pipeline: tokenizers, the embedded corpus, preparation into LitData shards, the datamodule.

Exports are resolved lazily, so ``python -m nsa_lit.data.prepare`` and tokenizer use do not import
Lightning/LitData.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nsa_lit.data.datamodule import TokenDataModule
    from nsa_lit.data.tokenizer import Tokenizer, load_tokenizer

__all__ = ["TokenDataModule", "Tokenizer", "load_tokenizer"]


def __getattr__(name: str) -> Any:
    if name == "TokenDataModule":
        from nsa_lit.data.datamodule import TokenDataModule

        return TokenDataModule
    if name in ("Tokenizer", "load_tokenizer"):
        from nsa_lit.data import tokenizer

        return getattr(tokenizer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
