"""Compare training runs: ``python -m nsa_lit.compare LOGDIR [LOGDIR ...] [--eval JSON ...]``.

:mod:`nsa_lit.compare.runs` reads runs (event files, ``hparams.yaml``, evaluation results),
:mod:`nsa_lit.compare.report` groups them by variant and writes the table and plots,
:func:`nsa_lit.compare.__main__.compare` does both (docs/compare.md).
"""
