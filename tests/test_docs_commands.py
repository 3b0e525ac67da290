"""Every command the documentation shows must still exist: each entry point answers ``--help``.

The commands are read from the docs, not listed here: ``README.md``, ``docs/*.md`` and the
how-to-run part of ``benchmarks/README.md`` (everything above its ``## Results log`` heading; the
log below it records past runs with their commands as they were, some since renamed). A command
is a fenced code block line or an inline code span that starts with ``python``, ``python3`` or
``bash`` (``\\`` continuations joined, comments dropped, chains split at ``&&``, ``||``, ``;``
and at a ``|`` with spaces around it, so ``--device cpu|meta`` stays whole).

Commands are grouped by entry point: the module of ``python -m M``, the script of ``python S.py``
plus the subcommand for ``main.py`` (``fit``, ``validate``), the script of ``bash S.sh``. Each
Python entry point runs once with ``--help`` (on the CPU: the GPU benchmarks parse their
arguments before they look for CUDA) and must exit 0, print a usage line and list every
``--option`` the docs pass it (optional ones written ``[--name VALUE]`` included). The runs share
one interpreter, which imports torch and Lightning once (``tests/help_runner.py``: ``sys.argv``,
``sys.path`` and the environment restored and the repository's modules imported afresh for each);
an entry point it gives no result for (it took the interpreter down) runs again as its own
``python ... --help``.

Shell scripts have no ``--help`` (their first argument is an output directory, and they start GPU
work at once), so they are not run: the test checks that the script exists, that ``bash -n``
parses it and that its header comment shows its usage as ``bash <path> ...``.

Skipped, with the reason in the test report: third-party tools (``python -m pytest``,
``python -m venv``, ``python -m pip``) and ``configs/make_configs.py``, which takes no options
and rewrites the config files when run (``tests/test_configs.py`` checks them).
"""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RESULTS_LOG = "## Results log"

PREFIXES = ("python", "python3", "bash")
THIRD_PARTY_MODULES = {"pytest", "venv", "pip"}
SKIP_SCRIPTS = {
    "configs/make_configs.py": "takes no options: running it rewrites configs/*/*.yaml from its "
                               "tables (tests/test_configs.py checks them)",
}
# entry points the docs are known to show: if extraction stops finding them, the parser broke
KNOWN = {
    "python main.py fit",
    "python -m nsa_lit.data.prepare",
    "python -m nsa_lit.model_stats",
    "python -m nsa_lit.kv_report",
    "python -m nsa_lit.generate",
    "python benchmarks/attention.py",
}

FENCE = re.compile(r"^[ \t]*(```|~~~)[^\n]*\n(.*?)^[ \t]*\1[ \t]*$", re.M | re.S)
INLINE = re.compile(r"`([^`]+)`")
CHAIN = re.compile(r"\s*(?:&&|\|\|)\s*|\s*;\s+|\s+\|\s+")  # not `cpu|meta`
COMMENT = re.compile(r"(?:^|\s)#.*$")
OPTION = re.compile(r"(--[A-Za-z][\w.-]*)")


@dataclass
class Entry:
    """One entry point and where the docs show it."""

    kind: str              # "module", "script" or "shell"
    target: str            # module name or script path (relative to the repository)
    sub: str | None = None  # main.py's subcommand
    sources: list[str] = field(default_factory=list)
    options: set[str] = field(default_factory=set)  # every --option the docs pass it

    @property
    def key(self) -> str:
        if self.kind == "module":
            return f"python -m {self.target}"
        if self.kind == "shell":
            return f"bash {self.target}"
        return f"python {self.target}" + (f" {self.sub}" if self.sub else "")

    @property
    def skip_reason(self) -> str | None:
        if self.kind == "module" and self.target.split(".")[0] in THIRD_PARTY_MODULES:
            return "a third-party tool, not an entry point of this repository"
        if self.kind == "script":
            return SKIP_SCRIPTS.get(self.target)
        return None

    def help_command(self) -> list[str]:
        if self.kind == "module":
            return [sys.executable, "-m", self.target, "--help"]
        return [sys.executable, self.target, *([self.sub] if self.sub else []), "--help"]

    def help_job(self) -> dict:
        """The same run, for ``tests/help_runner.py``."""
        args = [*([self.sub] if self.sub else []), "--help"]
        return {"key": self.key, "module" if self.kind == "module" else "script": self.target,
                "args": args}


def doc_sources() -> dict[str, str]:
    """``{relative path: text}`` of the documentation whose commands must work."""
    paths = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    texts = {str(p.relative_to(REPO)): p.read_text() for p in paths}
    bench = (REPO / "benchmarks/README.md").read_text()
    head, found, _ = bench.partition("\n" + RESULTS_LOG + "\n")
    if not found:
        raise AssertionError(f"benchmarks/README.md has no '{RESULTS_LOG}' heading, which "
                             "separates its how-to-run sections from the log of past runs")
    texts["benchmarks/README.md (above the results log)"] = head
    return texts


def commands(markdown: str) -> list[str]:
    """The shell commands starting with ``python``, ``python3`` or ``bash`` shown in fenced code
    blocks and inline code spans of ``markdown``."""
    found: list[str] = []

    def keep(line: str) -> None:
        for part in CHAIN.split(line.strip()):
            part = " ".join(part.removeprefix("$ ").split())
            if part.split(" ", 1)[0] in PREFIXES and " " in part:
                found.append(part)

    for match in FENCE.finditer(markdown):
        for line in match.group(2).replace("\\\n", " ").splitlines():
            keep(COMMENT.sub("", line))
    for span in INLINE.findall(FENCE.sub("", markdown)):
        keep(" ".join(span.split()))  # a span may cross a line break
    return found


def entry_point(command: str) -> Entry:
    """The entry point a command runs, with the ``--options`` the command passes it (optional
    ones shown as ``[--name VALUE]`` included)."""
    try:
        words = shlex.split(command, comments=True)
    except ValueError:  # an unbalanced quote in an example: the first words still tell
        words = command.split()
    options = {m.group(1) for w in words if (m := OPTION.match(w.lstrip("[")))}
    if words[0] == "bash":
        return Entry("shell", words[1])
    if words[1] == "-m":
        return Entry("module", words[2], options=options)
    script = os.path.normpath(words[1])
    sub = None
    if script == "main.py" and len(words) > 2 and not words[2].startswith("-"):
        sub = words[2]
    return Entry("script", script, sub, options=options)


def doc_entries() -> dict[str, Entry]:
    entries: dict[str, Entry] = {}
    for source, text in doc_sources().items():
        for command in commands(text):
            entry = entry_point(command)
            known = entries.setdefault(entry.key, entry)
            known.sources.append(source)
            known.options |= entry.options
    return entries


ENTRIES = doc_entries()
PYTHON = [e for e in ENTRIES.values() if e.kind != "shell"]
SHELL = [e for e in ENTRIES.values() if e.kind == "shell"]


@pytest.fixture(scope="module")
def help_runs(tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
    """``--help`` of every Python entry point that is not skipped, in one interpreter
    (``tests/help_runner.py``); one it leaves without a result runs on its own."""
    todo = [e for e in PYTHON if e.skip_reason is None]
    env = {**os.environ, "LITDATA_DISABLE_VERSION_CHECK": "1"}
    out = tmp_path_factory.mktemp("help") / "help.json"
    try:
        subprocess.run([sys.executable, str(REPO / "tests/help_runner.py"), str(out)], cwd=REPO,
                       env=env, input=json.dumps([e.help_job() for e in todo]),
                       capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        pass  # the entry points done so far are in out
    done = json.loads(out.read_text()) if out.exists() else {}
    runs = {}
    for entry in todo:
        if entry.key in done:
            runs[entry.key] = subprocess.CompletedProcess(entry.help_command(), **done[entry.key])
        else:
            runs[entry.key] = subprocess.run(entry.help_command(), cwd=REPO, env=env,
                                             capture_output=True, text=True, timeout=300)
    return runs


@pytest.mark.parametrize("source", sorted(doc_sources()))
def test_code_spans_pair_up(source):
    """An odd number of backticks outside code blocks would pair every later span wrongly, and
    the commands in them would be misread or missed."""
    text = FENCE.sub("", doc_sources()[source])
    assert text.count("`") % 2 == 0, f"{source}: an unpaired backtick outside code blocks"


def test_extraction_finds_the_known_commands():
    missing = KNOWN - set(ENTRIES)
    assert not missing, f"the docs no longer show (or the parser lost) {sorted(missing)}"


def test_extraction_parses_blocks_spans_and_chains():
    markdown = (
        "Run `python -m pkg.tool --x 1 [--device cpu|meta]`, then\n"
        "`python3 bench/b.py [--a 1]\n[--out NAME]`.\n"
        "Not commands: `pip install -r requirements.txt`, `python`, `decode.py`.\n\n"
        "```bash\n"
        "python -m venv .venv && . .venv/bin/activate   # set up\n"
        "python main.py fit --config c.yaml \\\n    --trainer.max_steps 1\n"
        "tensorboard --logdir logs\n"
        "bash tools/check.sh OUT [T_LIST]\n"
        "```\n"
    )
    found = commands(markdown)
    assert found == ["python -m venv .venv",
                     "python main.py fit --config c.yaml --trainer.max_steps 1",
                     "bash tools/check.sh OUT [T_LIST]",
                     "python -m pkg.tool --x 1 [--device cpu|meta]",
                     "python3 bench/b.py [--a 1] [--out NAME]"]
    keys = [entry_point(c).key for c in found]
    assert keys == ["python -m venv", "python main.py fit", "bash tools/check.sh",
                    "python -m pkg.tool", "python bench/b.py"]
    assert entry_point(found[1]).options == {"--config", "--trainer.max_steps"}
    assert entry_point(found[4]).options == {"--a", "--out"}
    assert entry_point(found[0]).skip_reason is not None


@pytest.mark.parametrize("entry", PYTHON, ids=lambda e: e.key)
def test_documented_entry_point_answers_help(entry: Entry, help_runs):
    if entry.skip_reason:
        if entry.kind == "script":
            assert (REPO / entry.target).is_file(), f"{entry.key}: no such script"
        pytest.skip(f"{entry.key}: {entry.skip_reason}")
    if entry.kind == "script":
        assert (REPO / entry.target).is_file(), \
            f"{entry.key} (shown in {sorted(set(entry.sources))}): no such script"
    done = help_runs[entry.key]
    shown = f"{entry.key} --help (shown in {sorted(set(entry.sources))})"
    assert done.returncode == 0, f"{shown} exited {done.returncode}:\n{done.stderr[-3000:]}"
    assert "usage" in done.stdout.lower(), f"{shown} printed no usage:\n{done.stdout[:2000]}"
    unknown = sorted(o for o in entry.options
                     if not re.search(rf"(?<![\w-]){re.escape(o)}(?![\w-])", done.stdout))
    assert not unknown, f"{shown}: the docs pass options its --help does not list: {unknown}"


@pytest.mark.parametrize("entry", SHELL, ids=lambda e: e.key)
def test_documented_shell_script_exists_and_shows_its_usage(entry: Entry):
    path = REPO / entry.target
    assert path.is_file(), f"{entry.key} (shown in {sorted(set(entry.sources))}): no such script"
    parsed = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert parsed.returncode == 0, f"bash -n {entry.target}: {parsed.stderr}"
    header = [line for line in path.read_text().splitlines()[:20] if line.startswith("#")]
    assert any(f"bash {entry.target}" in line for line in header), \
        f"{entry.target}: no '# bash {entry.target} ...' usage line in its header comment"
