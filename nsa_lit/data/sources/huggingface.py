"""``--source hf``: a Hugging Face ``datasets`` dataset, streamed (``load_dataset(..., streaming=True)``).

``--hf-dataset HuggingFaceFW/fineweb-edu --hf-config sample-10BT --hf-split train --text-field text``.
Records come in the dataset's own order (deterministic for a given dataset revision); a record is
one document, id ``<dataset>[/<config>]/<split>:<row>`` or, with ``--hf-id-field id``, the record's
own id. ``datasets`` is imported only when this source is used; offline, the dataset must be in the
local cache or be a local builder such as ``--hf-dataset json --hf-data-files 'shards/*.jsonl'``.
"""
from __future__ import annotations

import argparse
from typing import Any, Iterator, Sequence

from nsa_lit.data.sources import Document, InputProblems, Source, register


@register
class HuggingFaceDataset(Source):
    name = "hf"
    help = "a Hugging Face dataset, streamed (--hf-dataset, --hf-config, --hf-split, --text-field)"

    def __init__(self, dataset: str, config: str | None = None, split: str = "train", text_field: str = "text",
                 data_files: Sequence[str] | None = None, id_field: str | None = None) -> None:
        if not dataset:
            raise ValueError("source 'hf' needs --hf-dataset (a dataset name, or a builder such as 'json')")
        self.dataset, self.config, self.split = dataset, config, split
        self.text_field, self.id_field = text_field, id_field
        self.data_files = list(data_files) if data_files else None

    def _load(self) -> Any:
        try:
            import datasets
        except ImportError:
            raise ImportError(f"source 'hf' ({self.dataset}) needs the package 'datasets' (pip install datasets)") from None
        kwargs: dict[str, Any] = {"split": self.split, "streaming": True}
        if self.data_files:
            kwargs["data_files"] = self.data_files
        try:
            return datasets.load_dataset(self.dataset, self.config, **kwargs)
        except Exception as e:  # offline, unknown name, bad split: datasets raises many types
            raise ValueError(f"--hf-dataset {self.dataset!r} (config {self.config!r}, split {self.split!r}): "
                             f"datasets.load_dataset failed: {type(e).__name__}: {e}") from e

    def documents(self, problems: InputProblems) -> Iterator[Document]:
        prefix = "/".join(p for p in (self.dataset, self.config, self.split) if p)
        for row, record in enumerate(self._load()):
            where = f"{prefix}: row {row}"
            if self.text_field not in record:
                raise ValueError(f"{where}: no field {self.text_field!r} (fields: {sorted(record)}; set --text-field)")
            text = record[self.text_field]
            if not isinstance(text, str):
                problems.skip("records", where, f"field {self.text_field!r} is {type(text).__name__}, not a string")
                continue
            doc_id = f"{prefix}:{row}" if self.id_field is None else f"{prefix}:{record[self.id_field]}"
            if text.strip():
                yield doc_id, text

    def describe(self) -> dict[str, Any]:
        return {"source": self.name, "dataset": self.dataset, "config": self.config, "split": self.split,
                "text_field": self.text_field, "data_files": self.data_files, "id_field": self.id_field}

    @classmethod
    def add_arguments(cls, parser: Any) -> None:
        parser.add_argument("--hf-dataset", default=None, help="hf: dataset name or builder (e.g. HuggingFaceFW/fineweb-edu, json)")
        parser.add_argument("--hf-config", default=None, help="hf: dataset configuration (e.g. sample-10BT)")
        parser.add_argument("--hf-split", default="train", help="hf: split to read (default: train)")
        parser.add_argument("--hf-data-files", nargs="+", default=None, help="hf: data_files for builders such as json/parquet")
        parser.add_argument("--hf-id-field", default=None, help="hf: record field used as document id (default: row number)")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "HuggingFaceDataset":
        return cls(args.hf_dataset, args.hf_config, args.hf_split, text_field=args.text_field,
                   data_files=args.hf_data_files, id_field=args.hf_id_field)
