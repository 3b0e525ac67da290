"""LongBench's English tasks from LongBench's own local data files, scored with each task's metric.

Data: LongBench's ``<data_dir>/<task>.jsonl`` files (``data.zip`` of the Hugging Face dataset
``THUDM/LongBench``, unzipped), one JSON object per line with ``input``, ``context``,
``answers`` (list), ``all_classes`` (list or null), ``length`` (words) and ``_id``; nothing is
downloaded here (:data:`DATA_URL` says where the files come from).

Each task has LongBench's prompt template (``{context}`` and ``{input}`` filled in), its number of
new tokens and its metric (:mod:`nsa_lit.eval.longbench_metrics`). A prompt longer than the
model's budget is cut in the middle, LongBench's way: with ``budget = max_length -
max_new_tokens``, the first ``budget // 2`` and the last ``budget - budget // 2`` tokens are kept
(:func:`truncate_middle`). Answers are greedy (:func:`nsa_lit.generate.generate`, decode caches),
stopped at EOS; no chat template (the models here are base models). The few-shot tasks (trec,
triviaqa, samsum) are scored on the first line of the answer, as LongBench does.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from nsa_lit.eval.longbench_metrics import score_answers

DATA_URL = "https://huggingface.co/datasets/THUDM/LongBench/resolve/main/data.zip"


@dataclass(frozen=True)
class Task:
    """One LongBench task: its prompt template, generation budget and metric."""

    prompt: str             # str.format template with {context} and {input}
    max_new_tokens: int
    metric: str             # key of nsa_lit.eval.longbench_metrics.METRICS
    first_line: bool = False  # score only the first line of the answer (few-shot tasks)


_QA_PASSAGES = ("Answer the question based on the given passages. Only give me the answer and do "
                "not output any other words.\n\nThe following are given passages.\n{context}\n\n"
                "Answer the question based on the given passages. Only give me the answer and do "
                "not output any other words.\n\nQuestion: {input}\nAnswer:")
_QASPER_RULES = ("as concisely as you can, using a single phrase or sentence if possible. If the "
                 "question cannot be answered based on the information in the article, write "
                 "\"unanswerable\". If the question is a yes/no question, answer \"yes\", "
                 "\"no\", or \"unanswerable\". Do not provide any explanation.")
_NARRATIVE_RULES = ("as concisely as you can, using a single phrase if possible. Do not provide "
                    "any explanation.")

# LongBench's English tasks (config/dataset2prompt.json, dataset2maxlen.json, eval.py)
TASKS: dict[str, Task] = {
    "narrativeqa": Task(
        "You are given a story, which can be either a novel or a movie script, and a question. "
        f"Answer the question {_NARRATIVE_RULES}\n\nStory: {{context}}\n\nNow, answer the question "
        f"based on the story {_NARRATIVE_RULES}\n\nQuestion: {{input}}\n\nAnswer:", 128, "qa_f1"),
    "qasper": Task(
        f"You are given a scientific article and a question. Answer the question {_QASPER_RULES}"
        f"\n\nArticle: {{context}}\n\n Answer the question based on the above article "
        f"{_QASPER_RULES}\n\nQuestion: {{input}}\n\nAnswer:", 128, "qa_f1"),
    "multifieldqa_en": Task(
        "Read the following text and answer briefly.\n\n{context}\n\nNow, answer the following "
        "question based on the above text, only give me the answer and do not output any other "
        "words.\n\nQuestion: {input}\nAnswer:", 64, "qa_f1"),
    "hotpotqa": Task(_QA_PASSAGES, 32, "qa_f1"),
    "2wikimqa": Task(_QA_PASSAGES, 32, "qa_f1"),
    "musique": Task(_QA_PASSAGES, 32, "qa_f1"),
    "gov_report": Task(
        "You are given a report by a government agency. Write a one-page summary of the report."
        "\n\nReport:\n{context}\n\nNow, write a one-page summary of the report.\n\nSummary:",
        512, "rouge_l"),
    "qmsum": Task(
        "You are given a meeting transcript and a query containing a question or instruction. "
        "Answer the query in one or more sentences.\n\nTranscript:\n{context}\n\nNow, answer the "
        "query based on the above meeting transcript in one or more sentences.\n\nQuery: {input}"
        "\nAnswer:", 512, "rouge_l"),
    "multi_news": Task(
        "You are given several news passages. Write a one-page summary of all news. \n\nNews:\n"
        "{context}\n\nNow, write a one-page summary of all the news.\n\nSummary:", 512, "rouge_l"),
    "trec": Task(
        "Please determine the type of the question below. Here are some examples of questions."
        "\n\n{context}\n{input}", 64, "classification", first_line=True),
    "triviaqa": Task(
        "Answer the question based on the given passage. Only give me the answer and do not "
        "output any other words. The following are some examples.\n\n{context}\n\n{input}",
        32, "qa_f1", first_line=True),
    "samsum": Task(
        "Summarize the dialogue into a few short sentences. The following are some examples."
        "\n\n{context}\n\n{input}", 128, "rouge_l", first_line=True),
    "passage_count": Task(
        "There are some paragraphs below sourced from Wikipedia. Some of them may be duplicates. "
        "Please carefully read these paragraphs and determine how many unique paragraphs there "
        "are after removing duplicates. In other words, how many non-repeating paragraphs are "
        "there in total?\n\n{context}\n\nPlease enter the final count of unique paragraphs after "
        "removing duplicates. The output format should only contain the number, such as 1, 2, 3, "
        "and so on.\n\nThe final answer is: ", 32, "count"),
    "passage_retrieval_en": Task(
        "Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine which "
        "paragraph the abstract is from.\n\n{context}\n\nThe following is an abstract.\n\n{input}"
        "\n\nPlease enter the number of the paragraph that the abstract is from. The answer "
        "format must be like \"Paragraph 1\", \"Paragraph 2\", etc.\n\nThe answer is: ",
        32, "retrieval"),
    "lcc": Task("Please complete the code given below. \n{context}Next line of code:\n",
                64, "code_similarity"),
    "repobench-p": Task("Please complete the code given below. \n{context}{input}Next line of "
                        "code:\n", 64, "code_similarity"),
}

# LongBench-E's length buckets, on the ``length`` field (words)
LENGTH_BUCKETS = (("0-4k", 0, 4000), ("4-8k", 4000, 8000), ("8k+", 8000, float("inf")))


@dataclass
class Example:
    """One line of a task file."""

    task: str
    index: int               # line number among the task's examples (0-based)
    id: str
    context: str
    input: str
    answers: list[str]
    all_classes: list[str] | None
    length: int | None       # LongBench's length in words (None when absent)

    def prompt(self) -> str:
        return TASKS[self.task].prompt.format(context=self.context, input=self.input)


# -- data ------------------------------------------------------------------------------------
def parse_tasks(text: str) -> list[str]:
    """Comma-separated task names, checked against :data:`TASKS`."""
    tasks = [t.strip() for t in text.split(",") if t.strip()]
    if not tasks:
        raise ValueError("--tasks names no task")
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown LongBench task(s) {', '.join(unknown)}; the English tasks are "
                         f"{', '.join(TASKS)}")
    return list(dict.fromkeys(tasks))


def check_files(data_dir: str | Path, tasks: Sequence[str]) -> None:
    """Raise ``FileNotFoundError`` naming every missing ``<data_dir>/<task>.jsonl``, where to put
    it and where it comes from."""
    data_dir = Path(data_dir)
    missing = [str(data_dir / f"{t}.jsonl") for t in tasks
               if not (data_dir / f"{t}.jsonl").is_file()]
    if missing:
        raise FileNotFoundError(
            f"LongBench data file(s) missing: {', '.join(missing)}. LongBench's <task>.jsonl "
            f"files go in {data_dir}: they are in data.zip of the Hugging Face dataset "
            f"THUDM/LongBench ({DATA_URL}); download and unzip it on a machine with network, "
            f"then pass its data/ folder as --data_dir")


def read_task(data_dir: str | Path, task: str, limit: int | None = None) -> list[Example]:
    """The first ``limit`` (all when None) examples of ``<data_dir>/<task>.jsonl``; a line that is
    not a JSON object with ``context``, ``input`` and a list of ``answers`` raises ``ValueError``
    naming the file and line."""
    path = Path(data_dir) / f"{task}.jsonl"
    check_files(data_dir, [task])
    out: list[Example] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if limit is not None and len(out) >= limit:
                break
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: not JSON ({err})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
            for key in ("context", "input", "answers"):
                if key not in row:
                    raise ValueError(f"{where}: no field {key!r} (a LongBench line has input, "
                                     "context, answers, all_classes, length, _id)")
            answers = row["answers"]
            if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
                raise ValueError(f"{where}: 'answers' must be a list of strings")
            classes = row.get("all_classes")
            if TASKS[task].metric == "classification" and not classes:
                raise ValueError(f"{where}: task {task} needs 'all_classes' (its metric is "
                                 "classification)")
            length = row.get("length")
            out.append(Example(task, len(out), str(row.get("_id", len(out))),
                               str(row["context"] or ""), str(row["input"] or ""), answers,
                               list(classes) if classes else None,
                               int(length) if length is not None else None))
    if not out:
        raise ValueError(f"{path}: no examples")
    return out


# -- prompts ---------------------------------------------------------------------------------
def truncate_middle(ids: Sequence[int], budget: int) -> tuple[list[int], int]:
    """``ids`` cut to at most ``budget`` tokens in the middle: the first ``budget // 2`` and the
    last ``budget - budget // 2`` tokens kept. Returns the tokens and how many were dropped."""
    if budget < 1:
        raise ValueError(f"budget must be >= 1, got {budget}")
    ids = list(ids)
    if len(ids) <= budget:
        return ids, 0
    head = budget // 2
    return ids[:head] + ids[len(ids) - (budget - head):], len(ids) - budget


def prompt_budget(task: str, max_length: int) -> int:
    """Prompt tokens a task may use: ``max_length`` minus its new tokens."""
    budget = max_length - TASKS[task].max_new_tokens
    if budget < 1:
        raise ValueError(f"--max_length {max_length} leaves no room for a prompt of task {task}, "
                         f"which generates up to {TASKS[task].max_new_tokens} tokens")
    return budget


# -- evaluation ------------------------------------------------------------------------------
def evaluate(model, tokenizer, examples: Sequence[Example], max_length: int, batch_size: int = 1,
             progress: bool = False, generate_fn: Callable | None = None) -> list[dict[str, Any]]:
    """Greedy answers and scores, one record per example (in the order of ``examples``).
    Each task's prompts are decoded in batches of ``batch_size``, longest first; ``generate_fn``
    (default :func:`nsa_lit.generate.generate`) is a test hook."""
    if generate_fn is None:
        from nsa_lit.generate import generate as generate_fn
    if batch_size < 1:
        raise ValueError(f"--batch_size must be >= 1, got {batch_size}")
    prompts: dict[int, tuple[list[int], int, int]] = {}
    for k, ex in enumerate(examples):
        full = tokenizer.encode(ex.prompt())
        ids, dropped = truncate_middle(full, prompt_budget(ex.task, max_length))
        prompts[k] = (ids, len(full), dropped)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(examples), desc="longbench", unit="prompt")
    records: dict[int, dict[str, Any]] = {}
    for task in dict.fromkeys(ex.task for ex in examples):
        spec = TASKS[task]
        order = sorted((k for k, ex in enumerate(examples) if ex.task == task),
                       key=lambda k: (-len(prompts[k][0]), k))
        for start in range(0, len(order), batch_size):
            batch = order[start: start + batch_size]
            outputs = generate_fn(model, [prompts[k][0] for k in batch], spec.max_new_tokens,
                                  eos_id=tokenizer.eos_id)
            for k, out in zip(batch, outputs):
                ex = examples[k]
                prediction = tokenizer.decode([t for t in out if t != tokenizer.eos_id])
                score = score_answers(spec.metric, prediction, ex.answers, ex.all_classes,
                                      spec.first_line)
                records[k] = {"task": task, "index": ex.index, "id": ex.id, "length": ex.length,
                              "prompt_tokens": prompts[k][1], "truncated": prompts[k][2],
                              "prediction": prediction, "answers": ex.answers, "score": score}
            if bar is not None:
                bar.update(len(batch))
    if bar is not None:
        bar.close()
    return [records[k] for k in range(len(examples))]


def _percent(scores: Sequence[float]) -> float | None:
    return round(100 * sum(scores) / len(scores), 2) if scores else None


def summarize(records: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per task: ``score`` (LongBench's number: the mean sample score in percent, 2 decimals),
    ``accuracy`` (the same in [0, 1], the field ``nsa_lit.compare --eval`` reads), ``samples``,
    ``truncated`` (prompts cut in the middle), ``metric`` and ``by_length`` (LongBench-E's
    buckets of the ``length`` field, those with samples)."""
    out = {}
    for task in dict.fromkeys(r["task"] for r in records):
        rows = [r for r in records if r["task"] == task]
        score = _percent([r["score"] for r in rows])
        by_length = {}
        for name, lo, hi in LENGTH_BUCKETS:
            inside = [r["score"] for r in rows
                      if r["length"] is not None and lo <= r["length"] < hi]
            if inside:
                by_length[name] = _percent(inside)
        out[task] = {"score": score, "accuracy": score / 100, "samples": len(rows),
                     "truncated": sum(r["truncated"] > 0 for r in rows),
                     "metric": TASKS[task].metric, "by_length": by_length}
    return out


def average(summary: dict[str, dict[str, Any]]) -> float:
    """The mean of the task scores (percent, 2 decimals)."""
    return round(sum(s["score"] for s in summary.values()) / len(summary), 2)


def text_table(summary: dict[str, dict[str, Any]]) -> str:
    """One row per task (score in percent, metric, samples, prompts truncated) and the average."""
    width = max(len("average"), *(len(t) for t in summary))
    lines = [f"{'task':<{width}}  {'score':>6}  {'metric':<15} {'samples':>7} {'truncated':>9}"]
    for task, s in summary.items():
        lines.append(f"{task:<{width}}  {s['score']:6.2f}  {s['metric']:<15} {s['samples']:>7} "
                     f"{s['truncated']:>9}")
    lines.append(f"{'average':<{width}}  {average(summary):6.2f}")
    return "\n".join(lines)


def scalars(summary: dict[str, dict[str, Any]]) -> dict[str, float]:
    """TensorBoard tags: ``eval/longbench/<task>`` and ``eval/longbench/average`` (percent)."""
    out = {f"eval/longbench/{task}": s["score"] for task, s in summary.items()}
    out["eval/longbench/average"] = average(summary)
    return out
