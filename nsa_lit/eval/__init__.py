"""Evaluation of checkpoints, one module per task family (see ``docs/eval.md``).

- :mod:`nsa_lit.eval.likelihood`: per-sequence log-likelihood of a continuation (lm-eval's
  ``loglikelihood`` requests), batched and length-sorted.
- :mod:`nsa_lit.eval.retrieval`: long-context retrieval generated locally (S-NIAH-1/2/3,
  multi-key NIAH, MQAR), ``python -m nsa_lit.eval niah``.
"""
