"""The training progress bar, refreshed once per optimiser step.

Between two optimiser steps nothing in ``main.py fit`` waits for the GPU, so the host queues the
next micro-batch's kernels while the device runs the last one. Two things in Lightning would wait
after every micro-batch: metrics logged with ``prog_bar=True`` are read back as Python numbers
after each one (whether a bar is shown or not), and its bars refresh after each one. So
:class:`~nsa_lit.lit_module.LanguageModel` logs no ``prog_bar`` metric while training (and its
host numbers, which Lightning copies to the device with a blocking copy, only at the end of a
step), and :class:`StepProgressBar` reads what it shows (the loss, tokens/s) when it refreshes: on
the micro-batch that ends an optimiser step (and on the epoch's last). A run with gradient
accumulation then waits for the device once per optimiser step (the step's loss check) plus once
per refresh, however many micro-batches it has. ``main.py`` installs the bar in place of
Lightning's default one (:func:`use_step_progress_bar`); a bar named in ``trainer.callbacks`` is
kept as it is (Lightning's bars then show no training loss).
"""
from __future__ import annotations

from lightning.pytorch.callbacks import ProgressBar, TQDMProgressBar


class StepProgressBar(TQDMProgressBar):
    """``TQDMProgressBar`` whose training bar moves once per optimiser step; ``refresh_rate``
    counts optimiser steps (every ``refresh_rate``-th step refreshes). ``show``: logged metrics
    it shows beside the ``prog_bar`` ones, read (one wait for the device) at each refresh.
    Validation and test bars are Lightning's."""

    def __init__(self, refresh_rate: int = 1, process_position: int = 0, leave: bool = False,
                 show: list[str] | None = None):
        super().__init__(refresh_rate=refresh_rate, process_position=process_position, leave=leave)
        self.show = ["train/loss", "train/tokens_per_sec"] if show is None else list(show)

    def get_metrics(self, trainer, pl_module) -> dict:
        items = super().get_metrics(trainer, pl_module)
        logged = trainer.callback_metrics
        for name in self.show:
            if name in logged and name not in items:
                items[name] = float(logged[name])
        return items

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if not self.is_enabled or self._train_progress_bar is None:
            return
        bar, n = self.train_progress_bar, batch_idx + 1
        last = trainer.is_last_batch
        ends_step = n % trainer.accumulate_grad_batches == 0 or last
        if ends_step and (last or trainer.global_step % self.refresh_rate == 0):
            if not bar.disable:
                bar.n = n
                bar.refresh()
            bar.set_postfix(self.get_metrics(trainer, pl_module))


def use_step_progress_bar(trainer, configured_callbacks) -> None:
    """Replace the progress bar Lightning added by default to ``trainer.callbacks`` by a
    :class:`StepProgressBar`. Nothing changes when the bar is off (``enable_progress_bar:
    false``) or when ``configured_callbacks`` (the ones the config names) hold a progress bar."""
    if any(isinstance(c, ProgressBar) for c in configured_callbacks or []):
        return
    for i, callback in enumerate(trainer.callbacks):
        if isinstance(callback, ProgressBar):
            trainer.callbacks[i] = StepProgressBar()
            return
