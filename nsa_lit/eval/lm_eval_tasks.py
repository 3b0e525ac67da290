"""The lm-evaluation-harness tasks run by default and the metric that sums up each: shared by
the adapter (``nsa_lit.eval.lm_eval_adapter``, which needs ``lm_eval``) and the comparison
(``nsa_lit.compare``, which reads results files without it)."""
from __future__ import annotations

from collections.abc import Mapping

# the standard zero-shot commonsense list (issue 20)
DEFAULT_TASKS = ("wikitext", "lambada_openai", "piqa", "hellaswag", "winogrande", "arc_easy",
                 "arc_challenge", "social_iqa", "boolq")
# the metric that sums up a task (all metrics are in the results JSON); other tasks: ``acc``
MAIN_METRIC = {"wikitext": "word_perplexity", "lambada_openai": "acc", "hellaswag": "acc_norm",
               "arc_challenge": "acc_norm", "arc_easy": "acc_norm", "piqa": "acc_norm"}
# metrics that are not a fraction in [0, 1] (lower is better), never shown in percent
_UNBOUNDED = ("perplexity", "bits_per_byte")


def main_metric(task: str) -> str:
    return MAIN_METRIC.get(task, "acc")


def is_fraction(metric: str) -> bool:
    """Whether ``metric`` is a fraction (accuracy-like, shown in percent), not a perplexity or
    bits per byte."""
    return not any(word in metric for word in _UNBOUNDED)


def summary_metric(task: str, metrics: Mapping[str, object]) -> tuple[str, float] | None:
    """``(name, value)`` of the metric that sums up one task of lm-eval's ``results``
    (``{"acc,none": 0.61, "acc_stderr,none": ..., "alias": ...}``): the task's main metric,
    else ``acc``, else its first numeric metric; ``None`` when it has no number."""
    numeric = {key.split(",")[0]: float(value) for key, value in metrics.items()
               if isinstance(value, (int, float)) and not isinstance(value, bool)
               and "stderr" not in key}
    for name in (main_metric(task), "acc"):
        if name in numeric:
            return name, numeric[name]
    return next(iter(numeric.items()), None)
