"""Runs entry points' ``--help`` one after another in one interpreter, for
``tests/test_docs_commands.py``: torch and Lightning are imported once, not once per entry point.

``python tests/help_runner.py OUT.json`` reads a JSON list of jobs from stdin, each
``{"key": ..., "module": NAME | "script": PATH, "args": [...]}``, and runs each as ``python -m NAME``
or ``python PATH`` would (``__main__``, ``sys.argv``, ``sys.path[0]``), with its stdout and stderr
captured. After each job it writes ``{key: {"returncode", "stdout", "stderr"}}`` to ``OUT.json``,
so a job that takes the interpreter down leaves the others' results (the test runs the missing
ones as subprocesses).

Between jobs, ``sys.argv``, ``sys.path``, ``os.environ`` and the working directory are restored,
and the repository's own modules (``nsa_lit``, the benchmark scripts and their helpers,
``main``) are dropped from ``sys.modules``, so each entry point imports them afresh through its own
``sys.path``, as in a new interpreter. ``kernels`` stays: it registers torch custom ops, which can
be registered only once per process.
"""
from __future__ import annotations

import io
import json
import os
import runpy
import sys
import traceback
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# the repository's code imported afresh for each entry point (``kernels`` and ``tests`` stay; a
# virtual environment inside the repository, as CI's ``.venv-ci``, is not the repository's code)
FRESH = ("nsa_lit", "benchmarks", "scripts", "main.py")


def _repo_module(module) -> bool:
    file = getattr(module, "__file__", None)
    if not file:
        return False
    try:
        rel = Path(file).resolve().relative_to(REPO)
    except ValueError:
        return False
    return rel.parts[0] in FRESH


def _exit_code(exc: SystemExit) -> int:
    if exc.code is None:
        return 0
    if isinstance(exc.code, int):
        return exc.code
    print(exc.code, file=sys.stderr)  # as the interpreter does for sys.exit("message")
    return 1


def run(job: dict) -> dict:
    saved = sys.argv[:], sys.path[:], dict(os.environ), os.getcwd()
    for name in [n for n, m in sys.modules.items() if _repo_module(m)]:
        del sys.modules[name]
    out, err, code = io.StringIO(), io.StringIO(), 0
    try:
        with redirect_stdout(out), redirect_stderr(err):
            try:
                if "module" in job:  # python -m: the working directory first on the path
                    sys.argv = [job["module"], *job["args"]]
                    sys.path[0] = os.getcwd()
                    runpy.run_module(job["module"], run_name="__main__", alter_sys=True)
                else:  # python PATH: the script's directory first on the path
                    sys.argv = [job["script"], *job["args"]]
                    sys.path[0] = str(Path(job["script"]).resolve().parent)
                    runpy.run_path(job["script"], run_name="__main__")
            except SystemExit as exc:
                code = _exit_code(exc)
            except BaseException:  # noqa: BLE001 - reported like an uncaught exception
                traceback.print_exc()
                code = 1
    finally:
        sys.argv, sys.path[:] = saved[0], saved[1]
        os.environ.clear()
        os.environ.update(saved[2])
        os.chdir(saved[3])
    return {"returncode": code, "stdout": out.getvalue(), "stderr": err.getvalue()}


def main(out_path: str) -> None:
    results: dict[str, dict] = {}
    for job in json.load(sys.stdin):
        results[job["key"]] = run(job)
        Path(out_path).write_text(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1])
