"""Sources: the registry, local formats (txt / jsonl / jsonl.zst / parquet, directories, globs), a
Hugging Face dataset (a local `datasets` json builder), and bad input; token counts against a direct
tokenization of the documents."""
from __future__ import annotations

import importlib.util
import json
import os
import warnings
from pathlib import Path

os.environ.setdefault("LITDATA_DISABLE_VERSION_CHECK", "1")

import numpy as np
import pytest

from nsa_lit.data.prepare import build_parser, main as prepare_main, prepare, read_split_tokens
from nsa_lit.data.sources import InputProblems, Source, get_source, register, registry
from nsa_lit.data.sources.files import LocalFiles, expand_inputs
from nsa_lit.data.tokenizer import load_tokenizer

TEXTS = [f"Document {i}: sparse attention selects {i * 7 % 13} blocks, ünïcödé and tabs\there." for i in range(12)]


def _docs(source: Source, strict: bool = False) -> tuple[list[tuple[str, str]], InputProblems]:
    problems = InputProblems(strict=strict)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return list(source.documents(problems)), problems


def _direct(texts: list[str]) -> np.ndarray:
    tok = load_tokenizer("mistral-v1")
    return np.asarray([t for text in texts for t in tok.encode(text) + [tok.eos_id]], dtype=np.int64)


@pytest.fixture
def tree(tmp_path) -> Path:
    """corpus/a.txt, corpus/sub/b.txt, x.jsonl (3 lines, one blank), y.parquet (2 rows), more/*.jsonl"""
    (tmp_path / "corpus" / "sub").mkdir(parents=True)
    (tmp_path / "corpus" / "a.txt").write_text(TEXTS[0])
    (tmp_path / "corpus" / "sub" / "b.txt").write_text(TEXTS[1])
    (tmp_path / "corpus" / "ignored.md").write_text("not an input type")
    with open(tmp_path / "x.jsonl", "w") as f:
        f.write(json.dumps({"text": TEXTS[2]}) + "\n\n" + json.dumps({"text": TEXTS[3], "id": 9}) + "\n")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": TEXTS[4:6]}), tmp_path / "y.parquet")
    (tmp_path / "more").mkdir()
    for i, name in enumerate(["q.jsonl", "p.jsonl"]):
        (tmp_path / "more" / name).write_text(json.dumps({"text": TEXTS[6 + i]}) + "\n")
    return tmp_path


def test_registry_lists_every_source_module_and_a_new_one_is_one_class():
    assert {"files", "hf", "python-docs"} <= set(registry())
    with pytest.raises(ValueError, match="unknown source 'nope'"):
        get_source("nope")

    @register
    class Numbers(Source):
        name = "test-numbers"

        def documents(self, problems):
            return iter([(f"n{i}", f"number {i} " * 5) for i in range(4)])

        def describe(self):
            return {"source": self.name}

    assert registry()["test-numbers"] is Numbers
    assert "test-numbers" in build_parser().format_help()
    with pytest.raises(ValueError, match="registered twice"):
        register(type("Other", (Source,), {"name": "test-numbers"}))


def test_files_in_order_with_ids_and_exact_tokens(tree, tmp_path):
    inputs = [tree / "corpus", tree / "x.jsonl", tree / "y.parquet", str(tree / "more" / "*.jsonl")]
    docs, problems = _docs(LocalFiles(inputs))
    assert docs == [("corpus/a.txt", TEXTS[0]), ("corpus/sub/b.txt", TEXTS[1]), ("x.jsonl:1", TEXTS[2]),
                    ("x.jsonl:3", TEXTS[3]), ("y.parquet:1", TEXTS[4]), ("y.parquet:2", TEXTS[5]),
                    ("more/p.jsonl:1", TEXTS[7]), ("more/q.jsonl:1", TEXTS[6])]  # globs sorted by path
    assert problems.counts == {"files": 0, "records": 0}
    meta = prepare(inputs, tmp_path / "out", val_fraction=0.0, progress=False)
    stored = read_split_tokens(tmp_path / "out" / "train")
    np.testing.assert_array_equal(stored, _direct([t for _, t in docs]))
    assert meta["splits"]["train"] == {"documents": 8, "tokens": stored.size, "chunks": 1}
    assert meta["sources"] == [{"source": "files", "inputs": [str(p) for p in inputs], "text_field": "text"}]
    with pytest.raises(FileNotFoundError, match="matches no"):
        expand_inputs([str(tree / "*.nothing")])
    with pytest.raises(ValueError, match="unsupported file type"):
        expand_inputs([tree / "corpus" / "ignored.md"])


def test_jsonl_zst(tree, tmp_path):
    if importlib.util.find_spec("zstandard") is None:
        (tmp_path / "z.jsonl.zst").write_bytes(b"\x28\xb5\x2f\xfd")
        with pytest.raises(ImportError, match="zstandard"):
            _docs(LocalFiles([tmp_path / "z.jsonl.zst"]))
        pytest.skip("zstandard not installed (the clear error was checked)")
    import zstandard

    raw = "".join(json.dumps({"text": t}) + "\n" for t in TEXTS[:3]).encode()
    (tmp_path / "z.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(raw))
    docs, _ = _docs(LocalFiles([tmp_path / "z.jsonl.zst"]))
    assert docs == [(f"z.jsonl.zst:{i + 1}", t) for i, t in enumerate(TEXTS[:3])]


def test_bad_input_is_skipped_counted_and_named_or_strict(tmp_path):
    """Binary and non-UTF-8 files, bad JSON lines: none reaches the tokens; each is named in a
    warning and counted in meta.json; --strict makes the first one an error."""
    good = tmp_path / "good.txt"
    good.write_text(TEXTS[0])
    (tmp_path / "binary.txt").write_bytes(b"\x7fELF\x00\x01\x02" + TEXTS[1].encode())
    (tmp_path / "latin1.txt").write_bytes(TEXTS[2].encode("latin-1", errors="replace") + b"\xe9t\xe9")
    with open(tmp_path / "mixed.jsonl", "wb") as f:
        f.write(json.dumps({"text": TEXTS[3]}).encode() + b"\n")
        f.write(b'{"text": "broken\n')                                  # line 2: not JSON
        f.write(b'{"text": "caf\xe9"}\n')                               # line 3: not UTF-8
        f.write(json.dumps({"text": 42}).encode() + b"\n")              # line 4: not a string
        f.write(json.dumps({"body": "no text field"}).encode() + b"\n")  # line 5: no field
        f.write(json.dumps({"text": TEXTS[4]}).encode() + b"\n")
    inputs = [good, tmp_path / "binary.txt", tmp_path / "latin1.txt", tmp_path / "mixed.jsonl"]
    with pytest.warns(UserWarning) as record:
        meta = prepare(inputs, tmp_path / "out", val_fraction=0.0, progress=False)
    messages = "\n".join(str(w.message) for w in record)
    for where in ("binary.txt: binary", "latin1.txt: not UTF-8", "mixed.jsonl:2: not valid JSON",
                  "mixed.jsonl:3: not UTF-8", "mixed.jsonl:4: field 'text' is int", "mixed.jsonl:5: no field 'text'"):
        assert where in messages, where
    assert meta["skipped"] == {"files": 2, "records": 4} and meta["splits"]["train"]["documents"] == 3
    np.testing.assert_array_equal(read_split_tokens(tmp_path / "out" / "train"), _direct([TEXTS[0], TEXTS[3], TEXTS[4]]))

    for bad, where in ((tmp_path / "binary.txt", "binary.txt"), (tmp_path / "mixed.jsonl", "mixed.jsonl:2")):
        with pytest.raises(ValueError, match="--strict") as err:
            prepare([good, bad], tmp_path / f"strict-{bad.name}", strict=True, progress=False)
        assert where in str(err.value)
    assert prepare_main([str(good), str(tmp_path / "binary.txt"), "-o", str(tmp_path / "cli"), "--strict",
                         "--no-progress"]) == 2


def test_wrong_text_field_is_an_error_naming_it(tree):
    with pytest.raises(ValueError, match="x.jsonl:1: no field 'body'.*--text-field"):
        _docs(LocalFiles([tree / "x.jsonl"], text_field="body"))
    with pytest.raises(ValueError, match="no column 'body'"):
        _docs(LocalFiles([tree / "y.parquet"], text_field="body"))


def test_hugging_face_source_streams_a_local_dataset(tree, tmp_path, monkeypatch):
    """The hf source through `datasets` (json builder on local files, streamed; nothing downloaded)."""
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    files = []
    for f, rows in enumerate([TEXTS[8:10], TEXTS[10:12]]):
        files.append(str(tmp_path / f"h{f}.jsonl"))
        Path(files[-1]).write_text("".join(json.dumps({"text": t, "id": f"d{f}{i}"}) + "\n" for i, t in enumerate(rows)))
    hf = get_source("hf")("json", split="train", data_files=files)
    docs, _ = _docs(hf)
    assert docs == [(f"json/train:{i}", t) for i, t in enumerate(TEXTS[8:12])]
    with_ids = get_source("hf")("json", data_files=files, id_field="id")
    assert [d for d, _ in _docs(with_ids)[0]] == ["json/train:d00", "json/train:d01", "json/train:d10", "json/train:d11"]
    rc = prepare_main(["--source", "hf", "--hf-dataset", "json", "--hf-data-files", *files, "-o", str(tmp_path / "o"),
                       "--val-fraction", "0", "--no-progress"])
    assert rc == 0
    np.testing.assert_array_equal(read_split_tokens(tmp_path / "o" / "train"), _direct([t for _, t in docs]))
    with pytest.raises(ValueError, match="no field 'body'"):
        _docs(get_source("hf")("json", data_files=files, text_field="body"))
