"""Tokenizers behind one small interface, chosen by a spec string.

Specs (``load_tokenizer(spec, data_dir)``):

- ``"mistral-v1"`` (default): the 32,000-token Llama-2-style SentencePiece model that the PyPI wheel
  ``mistral-common`` ships as ``mistral_common/data/tokenizer.model.v1``; loaded with ``sentencepiece``
  alone (nothing is downloaded).
- a path to a ``*.model`` file: any SentencePiece model.
- a path to a ``tokenizer.json`` file: a Hugging Face ``tokenizers`` tokenizer.
- ``"bpe:<vocab_size>"``: a byte-level BPE trained with ``tokenizers`` on the corpus during
  preparation (:func:`train_bpe`) and stored as ``<data_dir>/tokenizer.json``; later loads read that file.
- anything else: a Hugging Face name or path through ``transformers.AutoTokenizer`` (only if
  ``transformers`` is installed). A local directory or the Hugging Face cache is tried first; a download
  is attempted only if the hub answers, so offline an uncached name fails at once.

Every error names the spec.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import socket
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

DEFAULT_TOKENIZER = "mistral-v1"
BPE_FILENAME = "tokenizer.json"
_BPE_SPECIAL = ("<unk>", "<s>", "</s>")  # ids 0, 1, 2: same layout as Llama-2 SentencePiece


class Tokenizer:
    """What the data pipeline needs from a tokenizer.

    ``encode`` never adds special tokens; the pipeline appends ``eos_id`` after each document itself.
    """

    def __init__(
        self,
        spec: str,
        encode: Callable[[str], list[int]],
        decode: Callable[[Sequence[int]], str],
        vocab_size: int,
        bos_id: int | None,
        eos_id: int,
        encode_batch: Callable[[list[str]], list[list[int]]] | None = None,
        source_path: Path | None = None,
        vocab: Callable[[], dict[str, int]] | None = None,
    ) -> None:
        self.spec = spec
        self.source_path = source_path  # the model/vocabulary file, if it is one
        self._vocab = vocab
        self._encode = encode
        self._decode = decode
        self._encode_batch = encode_batch
        self.vocab_size = int(vocab_size)
        self.bos_id = bos_id
        self.eos_id = int(eos_id)

    def encode(self, text: str) -> list[int]:
        return list(self._encode(text))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if self._encode_batch is not None:
            return [list(ids) for ids in self._encode_batch(texts)]
        return [self.encode(t) for t in texts]

    def decode(self, ids: Sequence[int] | Any) -> str:
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        return self._decode([int(i) for i in ids])

    def sha256(self) -> str:
        """SHA-256 of the tokenizer's model file (``*.model``, ``tokenizer.json``), else of its sorted
        vocabulary as JSON: two tokenizers with the same hash encode alike (recorded in ``meta.json``)."""
        h = hashlib.sha256()
        if self.source_path is not None:
            with open(self.source_path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
        elif self._vocab is not None:
            h.update(json.dumps(sorted(self._vocab().items())).encode("utf-8"))
        else:
            raise ValueError(f"tokenizer {self.spec!r}: neither a model file nor a vocabulary to hash")
        return h.hexdigest()

    def __repr__(self) -> str:
        return f"Tokenizer(spec={self.spec!r}, vocab_size={self.vocab_size}, bos_id={self.bos_id}, eos_id={self.eos_id})"


def mistral_v1_path() -> Path:
    """Path of ``tokenizer.model.v1`` inside the installed ``mistral_common`` package (not imported)."""
    spec = importlib.util.find_spec("mistral_common")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"tokenizer {DEFAULT_TOKENIZER!r}: the package 'mistral-common' is not installed "
            "(pip install mistral-common); it ships the SentencePiece file tokenizer.model.v1"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / "data" / "tokenizer.model.v1"
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"tokenizer {DEFAULT_TOKENIZER!r}: mistral_common/data/tokenizer.model.v1 not found in "
        f"{list(spec.submodule_search_locations)}"
    )


def _load_sentencepiece(path: Path, spec: str) -> Tokenizer:
    try:
        import sentencepiece as spm
    except ImportError as e:
        raise ImportError(f"tokenizer {spec!r} needs the package 'sentencepiece' (pip install sentencepiece)") from e
    try:
        sp = spm.SentencePieceProcessor(model_file=str(path))
    except Exception as e:  # sentencepiece raises RuntimeError/OSError with C++ messages
        raise ValueError(f"tokenizer {spec!r}: cannot load SentencePiece model {path}: {e}") from e
    eos = sp.eos_id()
    if eos < 0:
        raise ValueError(f"tokenizer {spec!r}: SentencePiece model {path} has no eos token")
    bos = sp.bos_id()
    return Tokenizer(
        spec,
        encode=lambda text: sp.encode(text),
        decode=lambda ids: sp.decode(list(ids)),
        vocab_size=sp.get_piece_size(),
        bos_id=bos if bos >= 0 else None,
        eos_id=eos,
        encode_batch=lambda texts: sp.encode(texts),
        source_path=path,
    )


def _find_special(tok: Any, names: Iterable[str]) -> int | None:
    for name in names:
        idx = tok.token_to_id(name)
        if idx is not None:
            return int(idx)
    return None


def _load_tokenizer_json(path: Path, spec: str) -> Tokenizer:
    try:
        from tokenizers import Tokenizer as HFTokenizer
    except ImportError as e:
        raise ImportError(f"tokenizer {spec!r} needs the package 'tokenizers' (pip install tokenizers)") from e
    try:
        tok = HFTokenizer.from_file(str(path))
    except Exception as e:
        raise ValueError(f"tokenizer {spec!r}: cannot load tokenizers file {path}: {e}") from e
    eos = _find_special(tok, ("</s>", "<|endoftext|>", "<eos>", "[SEP]", "<|end_of_text|>"))
    if eos is None:
        raise ValueError(
            f"tokenizer {spec!r}: {path} has no end-of-document token "
            "(looked for </s>, <|endoftext|>, <eos>, [SEP], <|end_of_text|>)"
        )
    bos = _find_special(tok, ("<s>", "<|begin_of_text|>", "<bos>", "[CLS]"))
    return Tokenizer(
        spec,
        encode=lambda text: tok.encode(text, add_special_tokens=False).ids,
        decode=lambda ids: tok.decode(list(ids), skip_special_tokens=False),
        vocab_size=tok.get_vocab_size(with_added_tokens=True),
        bos_id=bos,
        eos_id=eos,
        encode_batch=lambda texts: [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)],
        source_path=path,
    )


def _load_transformers(spec: str) -> Tokenizer:
    if importlib.util.find_spec("transformers") is None:
        raise ValueError(
            f"unknown tokenizer spec {spec!r}: not 'mistral-v1', not 'bpe:<vocab_size>', not an existing "
            "*.model / tokenizer.json file, and the package 'transformers' (needed for Hugging Face names) "
            "is not installed"
        )
    from transformers import AutoTokenizer

    try:  # a local directory or the Hugging Face cache first: no network round trip
        tok = AutoTokenizer.from_pretrained(spec, local_files_only=True)
    except Exception as local_error:
        if not _hub_reachable():  # offline, the hub client would retry for about a minute
            raise ValueError(
                f"tokenizer {spec!r}: not a local directory, not in the Hugging Face cache, and "
                f"{_hub_endpoint()} cannot be reached (offline?) to download it: {local_error}"
            ) from local_error
        try:
            tok = AutoTokenizer.from_pretrained(spec)
        except Exception as e:
            raise ValueError(f"tokenizer {spec!r}: transformers.AutoTokenizer could not load it: {e}") from e
    if tok.eos_token_id is None:
        raise ValueError(f"tokenizer {spec!r}: the Hugging Face tokenizer has no eos token")
    return Tokenizer(
        spec,
        encode=lambda text: tok.encode(text, add_special_tokens=False),
        decode=lambda ids: tok.decode(list(ids)),
        vocab_size=len(tok),
        bos_id=tok.bos_token_id,
        eos_id=tok.eos_token_id,
        vocab=tok.get_vocab,
    )


def _hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co")


def _hub_reachable(timeout_s: float = 3.0) -> bool:
    """Whether the Hugging Face hub can be contacted: not ``HF_HUB_OFFLINE`` and a TCP connection
    opens to the hub, or to the proxy the environment names for its scheme (``HTTPS_PROXY``...)."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return False
    url = urllib.parse.urlsplit(_hub_endpoint())
    if not url.hostname:
        return False
    proxy = urllib.request.getproxies().get(url.scheme)
    if proxy and not urllib.request.proxy_bypass(url.hostname):
        url = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    try:
        port = url.port or (443 if url.scheme == "https" else 80)
        socket.create_connection((url.hostname, port), timeout_s).close()
    except (OSError, ValueError, TypeError):
        return False
    return True


def parse_bpe_spec(spec: str) -> int | None:
    """``"bpe:8000"`` -> 8000; ``None`` if ``spec`` is not a bpe spec."""
    if not spec.startswith("bpe:"):
        return None
    try:
        vocab_size = int(spec[4:])
    except ValueError:
        raise ValueError(f"tokenizer {spec!r}: expected 'bpe:<vocab_size>' with an integer vocab size") from None
    if not 260 <= vocab_size <= 4_000_000:
        raise ValueError(f"tokenizer {spec!r}: vocab size must be at least 260 (256 bytes + specials)")
    return vocab_size


def train_bpe(spec: str, texts: Iterator[str], data_dir: str | os.PathLike) -> Tokenizer:
    """Train the byte-level BPE of a ``bpe:<vocab_size>`` spec on ``texts``; save ``<data_dir>/tokenizer.json``."""
    vocab_size = parse_bpe_spec(spec)
    if vocab_size is None:
        raise ValueError(f"tokenizer {spec!r}: train_bpe needs a 'bpe:<vocab_size>' spec")
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = HFTokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(_BPE_SPECIAL),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    out = Path(data_dir) / BPE_FILENAME
    out.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(out))
    return _load_tokenizer_json(out, spec)


def load_tokenizer(spec: str = DEFAULT_TOKENIZER, data_dir: str | os.PathLike | None = None) -> Tokenizer:
    """Load the tokenizer named by ``spec`` (see the module docstring). ``data_dir`` is where a
    ``bpe:<n>`` tokenizer was stored by preparation."""
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"tokenizer spec must be a non-empty string, got {spec!r}")
    if spec == DEFAULT_TOKENIZER:
        return _load_sentencepiece(mistral_v1_path(), spec)
    if parse_bpe_spec(spec) is not None:
        if data_dir is None:
            raise FileNotFoundError(
                f"tokenizer {spec!r} is trained during data preparation and stored in the data dir; "
                "pass data_dir to load it"
            )
        path = Path(data_dir) / BPE_FILENAME
        if not path.is_file():
            raise FileNotFoundError(
                f"tokenizer {spec!r}: {path} does not exist; prepare the data with this tokenizer first "
                f"(python -m nsa_lit.data.prepare --tokenizer {spec} ...)"
            )
        return _load_tokenizer_json(path, spec)
    path = Path(spec).expanduser()
    if path.suffix == ".model" or path.name.endswith(".model.v1"):
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer {spec!r}: SentencePiece model file not found")
        return _load_sentencepiece(path, spec)
    if path.suffix == ".json":
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer {spec!r}: tokenizers file not found")
        return _load_tokenizer_json(path, spec)
    if path.is_dir() and (path / BPE_FILENAME).is_file() and importlib.util.find_spec("transformers") is None:
        return _load_tokenizer_json(path / BPE_FILENAME, spec)
    return _load_transformers(spec)
