"""lm-evaluation-harness adapter: an nsa-lit checkpoint as an ``lm_eval`` model named ``nsa-lit``.

The harness owns the tasks (prompts, datasets, metrics); this module only answers its three
request types with our model and the checkpoint's tokenizer:

- ``loglikelihood`` (multiple-choice and cloze tasks): ``(context, continuation)`` encoded the
  harness' way (:class:`lm_eval.api.model.TemplateLM`: trailing context spaces move to the
  continuation; the continuation's tokens are those of ``context + continuation`` after the
  context's), scored by :func:`nsa_lit.eval.likelihood.loglikelihood` (batched, length-sorted,
  ``is_greedy``). A context longer than ``seq_len`` is cut from the left.
- ``loglikelihood_rolling`` (wikitext): the document after an EOS token, cut into the harness'
  rolling windows (:func:`lm_eval.utils.get_rolling_token_windows`, disjoint): every token is
  scored once, each window as long as the model's ``seq_len`` allows.
- ``generate_until``: greedy decoding (:func:`nsa_lit.generate.generate`, decode caches) of up to
  ``max_gen_toks`` tokens, cut at the first stop sequence (``until``) or EOS.

:func:`load_tasks` builds the harness tasks one by one so that a dataset the harness cannot reach
(offline, not in the Hugging Face cache) is an error naming the task; :func:`evaluate` runs
``lm_eval.simple_evaluate`` with this model. ``python -m nsa_lit.eval lm-eval`` is the command.
Importing this module registers the model, so ``lm_eval.simple_evaluate(model="nsa-lit",
model_args="ckpt_path=...")`` works too.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Sequence

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from nsa_lit.eval.likelihood import loglikelihood as score_loglikelihood
from nsa_lit.eval.lm_eval_tasks import main_metric

log = logging.getLogger(__name__)


@register_model("nsa-lit")
class NsaLitLM(TemplateLM):
    """An nsa-lit ``Transformer`` and its tokenizer behind lm-eval's ``LM`` interface.

    Build it from objects, ``NsaLitLM(model=m, tokenizer=t)``, or from a checkpoint,
    ``NsaLitLM(ckpt_path=P)`` (what ``model_args="ckpt_path=P"`` gives). ``batch_size``: requests
    per forward; ``max_gen_toks``: default generation budget of ``generate_until``.
    """

    def __init__(self, model=None, tokenizer=None, ckpt_path: str | None = None,
                 tokenizer_spec: str | None = None, data_dir: str | None = None,
                 batch_size: int | str | None = 8, device: str | None = None,
                 max_gen_toks: int = 256, progress: bool = True,
                 max_batch_size: int | None = None):  # (max_batch_size: simple_evaluate's, unused)
        super().__init__()
        if ckpt_path is not None:
            if model is not None:
                raise ValueError("pass either model= or ckpt_path=, not both")
            from nsa_lit.checkpoint import load_checkpoint
            from nsa_lit.generate import checkpoint_tokenizer

            device = device or ("cuda" if torch.cuda.is_available() else "cpu")
            model, data_hparams = load_checkpoint(ckpt_path, device)
            tokenizer = tokenizer or checkpoint_tokenizer(model.cfg, data_hparams,
                                                          tokenizer_spec, data_dir)
        if model is None or tokenizer is None:
            raise ValueError("NsaLitLM needs model= and tokenizer=, or ckpt_path=")
        if tokenizer.vocab_size > model.cfg.vocab_size:
            raise ValueError(f"tokenizer {tokenizer.spec!r} has {tokenizer.vocab_size} tokens, "
                             f"more than the model's vocab_size ({model.cfg.vocab_size})")
        if batch_size in (None, "", "auto"):
            batch_size = 8
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if int(max_gen_toks) < 1:
            raise ValueError(f"max_gen_toks must be >= 1, got {max_gen_toks}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = int(batch_size)
        self.max_gen_toks = int(max_gen_toks)
        self.progress = progress
        self._device = model.lm_head.weight.device

    # -- what the harness reads ------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def max_length(self) -> int:
        return self.model.cfg.seq_len

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.spec

    def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                   **kwargs) -> list[int]:
        return self.tokenizer.encode(string)  # our encode never adds special tokens

    def tok_decode(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(tokens)

    def get_model_info(self) -> dict[str, Any]:
        cfg = self.model.cfg
        return {"nsa_lit_layer_pattern": cfg.layer_pattern, "nsa_lit_seq_len": cfg.seq_len,
                "nsa_lit_vocab_size": cfg.vocab_size, "tokenizer": self.tokenizer.spec}

    # -- requests --------------------------------------------------------------------------------
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs
                              ) -> list[tuple[float, bool]]:
        """``requests``: ``((context, continuation), context_ids, continuation_ids)`` as
        :meth:`TemplateLM.loglikelihood` encodes them."""
        pairs = []
        for (context, continuation), ctx, cont in requests:
            if not cont:
                raise ValueError(f"continuation {continuation!r} (after context "
                                 f"{context[-40:]!r}) encodes to no tokens: nothing to score")
            pairs.append((ctx or [self.prefix_token_id], cont))
        results = score_loglikelihood(self.model, pairs, self.batch_size,
                                      progress=self.progress and not disable_tqdm)
        cut = sum(r.truncated > 0 for r in results)
        if cut:
            log.warning("%d of %d loglikelihood requests had their context cut from the left "
                        "to the model's seq_len (%d)", cut, len(results), self.max_length)
        out = []
        for (args, _, _), r in zip(requests, results):
            answer = (r.logprob, r.is_greedy)
            self.cache_hook.add_partial("loglikelihood", args, answer)
            out.append(answer)
        return out

    def rolling_windows(self, text: str) -> list[tuple[list[int], list[int]]]:
        """The ``(context, continuation)`` token windows that score ``text`` after EOS: every
        token once, each window at most ``seq_len`` tokens of input."""
        windows = get_rolling_token_windows(token_list=self.tok_encode(text),
                                            prefix_token=self.prefix_token_id,
                                            max_seq_len=self.max_length, context_len=1)
        return [make_disjoint_window(w) for w in windows]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for i, request in enumerate(requests):
            for window in self.rolling_windows(request.args[0]):
                windows.append(window)
                owner.append(i)
        scores = score_loglikelihood(self.model, windows, self.batch_size,
                                     progress=self.progress and not disable_tqdm)
        totals = [0.0] * len(requests)
        for i, r in zip(owner, scores):
            totals[i] += r.logprob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuations, cut before the first stop sequence. Requests with the same
        generation settings are decoded together in batches of ``batch_size``."""
        from nsa_lit.generate import generate

        groups: dict[tuple, list[int]] = {}
        settings = []
        for i, request in enumerate(requests):
            context, kwargs = request.args
            kwargs = dict(kwargs or {})
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_gen = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
            if kwargs.pop("do_sample", False) or float(kwargs.pop("temperature", 0.0) or 0.0) > 0:
                raise ValueError(f"request {i}: only greedy generation is supported "
                                 "(do_sample must be false and temperature 0)")
            if max_gen >= self.max_length:
                raise ValueError(f"request {i}: max_gen_toks={max_gen} leaves no room for a "
                                 f"prompt in the model's seq_len ({self.max_length})")
            stops = tuple(s for s in until if s)
            settings.append((context, stops, max_gen))
            groups.setdefault((stops, max_gen), []).append(i)
        batches = [(key, idx[s: s + self.batch_size]) for key, idx in groups.items()
                   for s in range(0, len(idx), self.batch_size)]
        bar = None
        if self.progress and not disable_tqdm:
            from tqdm import tqdm

            bar = tqdm(total=len(requests), desc="generate_until", unit="request")
        out: list[str | None] = [None] * len(requests)
        for (stops, max_gen), idx in batches:
            keep = self.max_length - max_gen  # prompt tokens that fit with the answer
            prompts = [(self.tok_encode(settings[i][0]) or [self.prefix_token_id])[-keep:]
                       for i in idx]
            new = generate(self.model, prompts, max_gen, eos_id=self.eot_token_id)
            for i, ids in zip(idx, new):
                text = self.tok_decode([t for t in ids if t != self.eot_token_id])
                for stop in stops:
                    text = text.split(stop, 1)[0]
                out[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
            if bar is not None:
                bar.update(len(idx))
        if bar is not None:
            bar.close()
        return out  # type: ignore[return-value]


# -- tasks and the run ---------------------------------------------------------------------------
class TaskDataError(RuntimeError):
    """A harness task whose dataset could not be loaded (offline and not cached, or missing)."""


def _dataset_of(task_manager, name: str) -> str:
    entry = task_manager.task_index.get(name)
    cfg = getattr(entry, "cfg", None) or {}
    path = cfg.get("dataset_path")
    return f"{path}" + (f" ({cfg['dataset_name']})" if cfg.get("dataset_name") else "") if path \
        else "its dataset"


def load_tasks(names: Sequence[str], task_manager=None) -> list:
    """Build each harness task (its dataset is loaded now) and return the built objects, ready
    for ``simple_evaluate(tasks=...)``. An unknown name is a ``ValueError``; a dataset that
    cannot be loaded is a :class:`TaskDataError` naming the task, its dataset and what to do."""
    from datasets.exceptions import DatasetsError
    from lm_eval.tasks import TaskManager

    task_manager = task_manager or TaskManager()
    unknown = [n for n in names if n not in task_manager.all_tasks]
    if unknown:
        raise ValueError(f"unknown lm-eval task(s) {', '.join(unknown)}: not in lm-eval "
                         f"{_version()}'s task index (nor an --include_path); "
                         "see `lm_eval ls tasks`")
    built = []
    for name in names:
        try:
            loaded = task_manager.load([name])
        except (OSError, DatasetsError) as err:  # ConnectionError offline, FileNotFoundError, ...
            offline = os.environ.get("HF_DATASETS_OFFLINE") or os.environ.get("HF_HUB_OFFLINE")
            cache = os.environ.get("HF_DATASETS_CACHE") or os.environ.get("HF_HOME") or \
                "~/.cache/huggingface (default)"
            raise TaskDataError(
                f"lm-eval task {name!r}: could not load {_dataset_of(task_manager, name)} "
                f"({type(err).__name__}: {err}). The harness reads task data from the Hugging "
                f"Face datasets cache ({cache})" + (", and offline mode is on" if offline else "")
                + f". On a machine with network, fill that cache first: `HF_DATASETS_CACHE=DIR "
                f"python -m nsa_lit.eval lm-eval --download_only --tasks {name}`, then run with "
                f"HF_DATASETS_CACHE=DIR (and HF_DATASETS_OFFLINE=1).") from err
        if name in loaded["groups"]:  # a group keeps its aggregate metrics
            built.append(loaded["groups"][name])
        elif name in loaded["tasks"]:
            built.append(loaded["tasks"][name])
        else:  # a tag: its tasks
            built.extend(loaded["tasks"].values())
    return built


def task_manager(tasks: Sequence[str], include_path: str | None = None):
    """A ``TaskManager`` that knows ``tasks``: the ``include_path`` folder alone when it defines
    them all (indexing lm-eval's own few thousand task files takes seconds), else lm-eval's tasks
    plus ``include_path`` (whose tasks take precedence)."""
    from lm_eval.tasks import TaskManager

    if include_path:
        local = TaskManager(include_path=include_path, include_defaults=False)
        if all(t in local.all_tasks for t in tasks):
            return local
    return TaskManager(include_path=include_path)


def _version() -> str:
    from importlib.metadata import version

    return version("lm_eval")


def evaluate(lm: NsaLitLM, tasks: Sequence, task_manager=None, limit: int | float | None = None,
             num_fewshot: int | None = None, seed: int = 0, log_samples: bool = False,
             bootstrap_iters: int = 0) -> dict[str, Any]:
    """``lm_eval.simple_evaluate`` of ``lm`` on ``tasks`` (names, or what :func:`load_tasks`
    built); returns the harness' results dict (``results[task][f"{metric},none"]``, and
    ``samples`` when ``log_samples``)."""
    from lm_eval import simple_evaluate

    built = load_tasks(list(tasks), task_manager) if all(isinstance(t, str) for t in tasks) \
        else list(tasks)
    return simple_evaluate(model=lm, tasks=built, task_manager=task_manager, limit=limit,
                           num_fewshot=num_fewshot, log_samples=log_samples,
                           bootstrap_iters=bootstrap_iters, random_seed=seed,
                           numpy_random_seed=seed, torch_random_seed=seed,
                           fewshot_random_seed=seed)


def summary_rows(results: dict[str, Any]) -> list[tuple[str, str, float, float | None]]:
    """``(task, metric, value, stderr)`` for every numeric metric the harness reported."""
    rows = []
    for task, metrics in results.get("results", {}).items():
        for key, value in metrics.items():
            if "_stderr," in key or "," not in key or not isinstance(value, (int, float)):
                continue
            metric, _filter = key.split(",", 1)
            stderr = metrics.get(f"{metric}_stderr,{_filter}")
            rows.append((task, metric, float(value),
                         float(stderr) if isinstance(stderr, (int, float)) else None))
    return rows


def text_table(results: dict[str, Any]) -> str:
    """One line per task and metric, the task's main metric first (marked ``*``)."""
    rows = summary_rows(results)
    rows.sort(key=lambda r: (r[0], r[1] != main_metric(r[0]), r[1]))
    width = max([len(r[0]) for r in rows] + [4])
    lines = [f"{'task':<{width}}  {'metric':<18} {'value':>10} {'stderr':>8}"]
    for task, metric, value, stderr in rows:
        mark = "*" if metric == main_metric(task) else " "
        err = f"{stderr:8.4f}" if stderr is not None else f"{'':>8}"
        lines.append(f"{task:<{width}} {mark}{metric:<18} {value:10.4f} {err}")
    return "\n".join(lines)
