"""Corpora as a registry: one module per source, each yielding ``(doc_id, text)`` in a fixed order.

A source is a :class:`Source` subclass decorated with :func:`register`; every module of this package
is imported on first use (:func:`registry`), so a new corpus is one new file here. The preparation
(:mod:`nsa_lit.data.prepare`) only sees the interface:

- ``documents(problems)``: ``(doc_id, text)`` pairs, always in the same order for the same settings
  (resume skips the first ``n`` of them; the train/val split and ``--shard`` are decided by a hash of
  ``doc_id``, so ids must be unique and stable). Empty texts are not yielded.
- ``describe()``: a JSON-able description written to the manifest (and compared on resume).
- ``add_arguments(parser)`` / ``from_args(args)``: its command-line options.

Bad input goes through :class:`InputProblems`: a skipped file or record is counted and named in a
warning, or raises ``ValueError`` under ``--strict``; nothing is silently turned into tokens.
"""
from __future__ import annotations

import argparse
import importlib
import pkgutil
import warnings
from typing import Any, ClassVar, Iterator

Document = tuple[str, str]  # (doc_id, text)

_REGISTRY: dict[str, type["Source"]] = {}
_MAX_WARNINGS = 20  # per run; later problems are only counted (the manifest has the totals)


class InputProblems:
    """Counts skipped input (whole files, single records), warns naming each, or raises under ``strict``.

    ``muted`` (while a resumed preparation re-reads documents it already has): neither counted nor warned.
    """

    def __init__(self, strict: bool = False) -> None:
        self.strict = strict
        self.muted = False
        self.counts = {"files": 0, "records": 0}
        self.examples: list[str] = []
        self._warned = 0

    def skip(self, kind: str, where: str, why: str) -> None:
        """Skip one ``kind`` ("files" or "records") at ``where`` (a path, or ``path:line``) because ``why``."""
        if kind not in self.counts:
            raise ValueError(f"unknown problem kind {kind!r}")
        message = f"{where}: {why}"
        if self.strict:
            raise ValueError(f"{message} (--strict: bad input is an error; without it, it is skipped with a warning)")
        if self.muted:
            return
        self.counts[kind] += 1
        if len(self.examples) < _MAX_WARNINGS:
            self.examples.append(message)
        self._warned += 1
        if self._warned <= _MAX_WARNINGS:
            more = "" if self._warned < _MAX_WARNINGS else " (further problems are only counted)"
            warnings.warn(f"skipped {kind[:-1]} {message}{more}", stacklevel=2)

    def state(self) -> dict[str, Any]:
        return {"counts": dict(self.counts), "examples": list(self.examples)}

    def load(self, state: dict[str, Any]) -> None:
        self.counts = {**self.counts, **state.get("counts", {})}
        self.examples = list(state.get("examples", []))
        self._warned = sum(self.counts.values())


class Source:
    """A corpus: documents in a deterministic order, plus how to describe and configure it."""

    name: ClassVar[str]
    help: ClassVar[str] = ""

    def documents(self, problems: InputProblems) -> Iterator[Document]:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
        """Add this source's command-line options (names unique across sources)."""

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "Source":
        raise NotImplementedError


def register(cls: type[Source]) -> type[Source]:
    """Class decorator: make ``cls`` available as ``--source <cls.name>``."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"{cls.__qualname__}: a registered source needs a class attribute `name`")
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        raise ValueError(f"source name {name!r} is registered twice ({_REGISTRY[name].__qualname__}, {cls.__qualname__})")
    _REGISTRY[name] = cls
    return cls


def registry() -> dict[str, type[Source]]:
    """All sources by name, after importing every module of this package (sorted by name)."""
    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")
    return dict(sorted(_REGISTRY.items()))


def get_source(name: str) -> type[Source]:
    sources = registry()
    if name not in sources:
        raise ValueError(f"unknown source {name!r} (known: {', '.join(sources)})")
    return sources[name]
