"""LongBench's scoring functions, written here so that no package beyond the standard library is
needed (LongBench itself uses ``rouge`` and ``fuzzywuzzy``).

Every function takes one prediction and one reference answer and returns a score in [0, 1]; a
sample's score is the best over its reference answers (:func:`score_answers`) and a task's score
is the mean over samples, in percent. Each follows LongBench's ``metrics.py`` (THUDM/LongBench)
and the library it calls, edge cases included:

- :func:`qa_f1`: token F1 after SQuAD-style normalisation (:func:`normalize_answer`: lower case,
  punctuation removed, articles ``a``/``an``/``the`` removed, whitespace collapsed).
- :func:`rouge_l`: the ``rouge`` package's (1.0.1) summary-level ROUGE-L F: texts split into
  sentences at every ``.``, words at spaces; precision and recall count *distinct* words (its
  default ``exclusive=True``) and the union of the words of each (reference sentence, predicted
  sentence) longest common subsequence, ``F = 2PR / (P + R + 1e-8)``; 0 for a text with no
  sentence (empty, or only dots), where ``rouge`` raises and LongBench scores 0.
- :func:`classification`: the classes named in the prediction (substring), minus those that are
  a strict substring of the answer, dropped in LongBench's order (removing from the list while
  iterating it, so the class right after a dropped one is not checked); ``1 / #matches`` when
  the answer is among them, else 0 (LongBench's similarity fallback is never reached).
- :func:`retrieval`: of the numbers in the prediction, the fraction equal to the paragraph number
  of the answer (``Paragraph N``); 0 without numbers.
- :func:`count`: of the numbers in the prediction, the fraction equal to the answer.
- :func:`code_similarity`: the first line of the prediction (leading newlines dropped) that has
  no backtick, ``#`` or ``//``, compared with the answer by ``fuzzywuzzy``'s ``fuzz.ratio``:
  100 for equal strings, 0 when either is empty, else ``round(100 * difflib ratio)``, divided by
  100. (``fuzzywuzzy`` uses ``python-Levenshtein``'s ratio instead of ``difflib`` when that
  package is installed; this is the pure-Python one.)
"""
from __future__ import annotations

import difflib
import re
import string
from collections import Counter
from typing import Callable, Sequence

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_NUMBER = re.compile(r"\d+")
_PARAGRAPH = re.compile(r"Paragraph (\d+)")


# -- QA F1 -----------------------------------------------------------------------------------
def normalize_answer(text: str) -> str:
    """Lower case, punctuation removed, then the articles, then whitespace runs collapsed."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def token_f1(prediction: Sequence[str], reference: Sequence[str]) -> float:
    """F1 of the multiset overlap of two token lists (0 when nothing is shared)."""
    same = sum((Counter(prediction) & Counter(reference)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(prediction), same / len(reference)
    return 2 * precision * recall / (precision + recall)


def qa_f1(prediction: str, answer: str, **_) -> float:
    return token_f1(normalize_answer(prediction).split(), normalize_answer(answer).split())


# -- ROUGE-L ---------------------------------------------------------------------------------
def _sentences(text: str) -> list[list[str]]:
    """The ``rouge`` package's split: pieces between dots (empty pieces dropped before the
    whitespace is collapsed, so a piece of spaces stays as one empty word), words at spaces."""
    return [" ".join(piece.split()).split(" ") for piece in text.split(".") if piece]


def lcs_words(reference: Sequence[str], prediction: Sequence[str]) -> list[str]:
    """The words of one longest common subsequence, the one ``rouge`` reconstructs: walking back
    from the end, a match is taken, else the reference steps back when that keeps a strictly
    longer subsequence, else the prediction does."""
    n, m = len(reference), len(prediction)
    table = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(1, n + 1):
        row, above = table[i], table[i - 1]
        for j in range(1, m + 1):
            row[j] = above[j - 1] + 1 if reference[i - 1] == prediction[j - 1] \
                else max(above[j], row[j - 1])
    out, i, j = [], n, m
    while i > 0 and j > 0:
        if reference[i - 1] == prediction[j - 1]:
            out.append(reference[i - 1])
            i, j = i - 1, j - 1
        elif table[i - 1][j] > table[i][j - 1]:
            i -= 1
        else:
            j -= 1
    return out[::-1]


def rouge_l(prediction: str, answer: str, **_) -> float:
    hyp, ref = _sentences(prediction), _sentences(answer)
    if not hyp or not ref:
        return 0.0
    union: set[str] = set()
    for r in ref:
        for h in hyp:
            union.update(lcs_words(r, h))
    recall = len(union) / len({w for s in ref for w in s})
    precision = len(union) / len({w for s in hyp for w in s})
    return 2.0 * precision * recall / (precision + recall + 1e-8)


# -- classification, retrieval, count ----------------------------------------------------------
def classification(prediction: str, answer: str, all_classes: Sequence[str] = (), **_) -> float:
    matches = [c for c in all_classes if c in prediction]
    i = 0
    while i < len(matches):  # LongBench removes while iterating: the next match is skipped
        term = matches[i]
        if term in answer and term != answer:
            matches.remove(term)
        i += 1
    return 1.0 / len(matches) if answer in matches else 0.0


def _fraction_equal(prediction: str, target: str) -> float:
    numbers = _NUMBER.findall(prediction)
    return sum(n == target for n in numbers) / len(numbers) if numbers else 0.0


def retrieval(prediction: str, answer: str, **_) -> float:
    found = _PARAGRAPH.findall(answer)
    if not found:
        raise ValueError(f"passage retrieval answer {answer!r} names no 'Paragraph N'")
    return _fraction_equal(prediction, found[0])


def count(prediction: str, answer: str, **_) -> float:
    return _fraction_equal(prediction, str(answer))


# -- code ------------------------------------------------------------------------------------
def fuzz_ratio(a: str, b: str) -> int:
    """``fuzzywuzzy.fuzz.ratio`` with ``difflib``: an integer in [0, 100]."""
    if a == b:
        return 100
    if not a or not b:
        return 0
    return int(round(100 * difflib.SequenceMatcher(None, a, b).ratio()))


def code_similarity(prediction: str, answer: str, **_) -> float:
    line = next((ln for ln in prediction.lstrip("\n").split("\n")
                 if "`" not in ln and "#" not in ln and "//" not in ln), "")
    return fuzz_ratio(line, answer) / 100


METRICS: dict[str, Callable[..., float]] = {
    "qa_f1": qa_f1, "rouge_l": rouge_l, "classification": classification,
    "retrieval": retrieval, "count": count, "code_similarity": code_similarity,
}


def first_line(prediction: str) -> str:
    """The first line after any leading newlines (LongBench scores only this for its few-shot
    tasks, whose prompts go on with further examples)."""
    return prediction.lstrip("\n").split("\n")[0]


def score_answers(metric: str, prediction: str, answers: Sequence[str],
                  all_classes: Sequence[str] | None = None, only_first_line: bool = False) -> float:
    """The best score of ``prediction`` over the reference ``answers`` (0 for none), in [0, 1]."""
    if metric not in METRICS:
        raise ValueError(f"unknown LongBench metric {metric!r}; known: {', '.join(METRICS)}")
    if only_first_line:
        prediction = first_line(prediction)
    fn = METRICS[metric]
    return max((fn(prediction, a, all_classes=all_classes or ()) for a in answers), default=0.0)
