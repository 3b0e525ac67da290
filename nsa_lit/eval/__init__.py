"""Evaluation of checkpoints, one module per task family (see ``docs/eval.md``).

- :mod:`nsa_lit.eval.likelihood`: per-sequence log-likelihood of a continuation (lm-eval's
  ``loglikelihood`` requests), batched and length-sorted.
- :mod:`nsa_lit.eval.retrieval`: long-context retrieval generated locally (S-NIAH-1/2/3,
  multi-key NIAH, MQAR), ``python -m nsa_lit.eval niah``.
- :mod:`nsa_lit.eval.lm_eval_adapter`: the checkpoint as an lm-evaluation-harness model
  (``nsa-lit``), ``python -m nsa_lit.eval lm-eval``.
- :mod:`nsa_lit.eval.perplexity`: perplexity by context length on a held-out split,
  ``python -m nsa_lit.eval ppl``.
- :mod:`nsa_lit.eval.longbench`: LongBench's English tasks from its local data files, scored by
  :mod:`nsa_lit.eval.longbench_metrics`, ``python -m nsa_lit.eval longbench``.
- :mod:`nsa_lit.eval.tensorboard`: any of these results as TensorBoard scalars (``--tb_dir``).
"""
