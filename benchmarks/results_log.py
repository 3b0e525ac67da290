"""Where the benchmark scripts keep what they measure: a printed table and a JSON record that
is rewritten after every row, so a run cut short keeps what it measured."""
from __future__ import annotations

import json
import os
import shlex

def run_record(script: str, argv: list[str] | None, device: str | None = None, **fields) -> dict:
    """What a results record starts with: ``device`` (default: the CUDA device's name, else
    ``"cpu"``), the torch and Python versions, ``fields``, the UTC date and the command as run
    (``python3 benchmarks/<script>`` and ``argv``, default the process's arguments)."""
    import datetime
    import platform
    import sys

    import torch

    if device is None:
        device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    args = argv if argv is not None else sys.argv[1:]
    versions = {"torch": torch.__version__, "python": platform.python_version()}
    for name in ("triton", "lightning"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            pass
    if torch.version.cuda:
        versions["cuda"] = torch.version.cuda
    return {"device": device, **versions, **_git_state(), **fields,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": shlex.join([f"python3 benchmarks/{script}", *args])}


def _git_state() -> dict:
    """``commit`` (and ``dirty``: uncommitted changes to tracked files) of the repository the
    scripts run from, when it is a git checkout with git installed."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                                text=True, timeout=10)
        if commit.returncode:
            return {}
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                capture_output=True, text=True, timeout=10)
        return {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return {}


RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def results_path(value: str) -> str:
    """``--out`` value -> file: a value with a ``/`` or ending in ``.json`` is a path, anything
    else a name under ``benchmarks/results/``."""
    if os.sep in value or value.endswith(".json"):
        return value
    return os.path.join(RESULTS_DIR, f"{value}.json")


class ResultsLog:
    """``record`` (run metadata; rows go to ``record["results"]``) saved to ``out`` (or not,
    when None) after each :meth:`add`; rows are printed under ``header`` as they come and again
    all together by :meth:`summary`."""

    def __init__(self, record: dict, header: str, out: str | None = None):
        self.record, self.header, self.lines = record, header, []
        self.record.setdefault("results", [])
        self.path = results_path(out) if out else None
        print(header, flush=True)

    def add(self, row: dict, line: str | None = None) -> None:
        self.record["results"].append(row)
        if line is not None:
            print(line, flush=True)
            self.lines.append(line)
        self.save()

    def save(self) -> None:
        if self.path:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            with open(self.path, "w") as f:
                json.dump(self.record, f, indent=1)

    def summary(self) -> None:
        print("\n" + self.header + "\n" + "\n".join(self.lines))
        if self.path:
            print(f"wrote {self.path}")
