"""LightningCLI entry point: ``python main.py {fit,validate,test} --config ...``.

``test`` scores a checkpoint on the data's held-out test split (``test/loss``, ``test/ppl``).
LightningCLI's ``predict`` is not a subcommand here (a language model's predictions are generated
text): ``main.py predict`` is refused with a message naming ``python -m nsa_lit.generate``.

Checkpoint files are saved atomically (:class:`nsa_lit.checkpoint.AtomicCheckpointIO`, installed
unless ``trainer.plugins`` gives a checkpoint IO); the configs' ``RunCheckpoint`` keeps each run's
checkpoints in ``checkpoints/<logger name>/<logger version>``. The progress bar is
:class:`nsa_lit.progress.StepProgressBar` (refreshed once per optimiser step) unless
``trainer.callbacks`` names one.

Run identity: the configs name their logger ``<size>/<variant>`` (``340m/asa``) and leave its
``version`` unset; a logger without a version gets ``seed<k>`` from ``seed_everything``
(:func:`version_loggers_by_seed`), so a run logs to ``logs/340m/asa/seed1234`` and checkpoints to
``checkpoints/340m/asa/seed1234``, and ``--seed_everything 7`` starts a separate run beside it."""
from __future__ import annotations

import os

os.environ.setdefault("LITDATA_DISABLE_VERSION_CHECK", "1")

import importlib  # noqa: E402
import sys  # noqa: E402

from lightning.pytorch.cli import LightningCLI  # noqa: E402
from lightning.pytorch.strategies import ModelParallelStrategy, StrategyRegistry  # noqa: E402

from nsa_lit.checkpoint import use_atomic_checkpoint_io  # noqa: E402
from nsa_lit.data import TokenDataModule  # noqa: E402
from nsa_lit.lit_module import LanguageModel, build_on_meta  # noqa: E402
from nsa_lit.progress import use_step_progress_bar  # noqa: E402


class NSALightningCLI(LightningCLI):
    """The model's context length is the data's sequence length: ``data.seq_len`` follows
    ``model.arch.seq_len``. Options must be spelled out: argparse's prefix matching would take
    ``--model.arch.n_head`` for ``--model.arch.n_heads``; here it is an error."""

    def init_parser(self, **kwargs):
        return super().init_parser(**{"allow_abbrev": False, **kwargs})

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """LightningCLI's subcommands but ``predict``: ``fit``, ``validate``, ``test``."""
        return {name: skip for name, skip in LightningCLI.subcommands().items() if name != "predict"}

    def parse_arguments(self, parser, args) -> None:
        """LightningCLI's, with ``predict`` refused by a message that says what to use instead."""
        argv = sys.argv[1:] if args is None else args
        if isinstance(argv, (list, tuple)) and _subcommand(argv) == "predict":
            parser.error(PREDICT_REMOVED)
        super().parse_arguments(parser, args)

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("model.arch.seq_len", "data.seq_len")

    def _set_seed(self) -> None:
        """LightningCLI's; remembers whether ``seed_everything`` was fixed (an int) or not
        (``true``: drawn anew each launch, ``false``: none), which names the run."""
        self.seed_fixed = not isinstance(self._get(self.config, "seed_everything"), bool)
        super()._set_seed()

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        if self.subcommand == "fit" and config.get("ckpt_path") == "last" and not getattr(
                self, "seed_fixed", True):
            raise ValueError(
                "--ckpt_path last resumes the run of this seed (logs and checkpoints of "
                "<name>/seed<k>), but seed_everything is not an integer: each launch would be a "
                "new run and start from scratch. Set --seed_everything to the run's seed (its "
                "checkpoint directory's seed<k>)")
        version_loggers_by_seed(config)

    def instantiate_classes(self) -> None:
        """Under a model-parallel strategy (FSDP2: ``nsa_lit.parallel.FSDP2Strategy`` or
        Lightning's ``ModelParallelStrategy``) the model is built on the meta device; the
        trainer's ``configure_model`` shards it and initialises each process's shards."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        with build_on_meta(_is_model_parallel(config.get("trainer", {}).get("strategy"))):
            super().instantiate_classes()

    def instantiate_trainer(self, **kwargs):
        """Lightning's trainer, with atomic checkpoint files and, unless the config names a
        progress bar, :class:`nsa_lit.progress.StepProgressBar` (one device read per optimiser
        step, not per micro-batch)."""
        config = self.config_init[self.subcommand] if self.subcommand else self.config_init
        configured = config.get("trainer", {}).get("callbacks") or []
        configured = list(configured) if isinstance(configured, list) else [configured]
        trainer = super().instantiate_trainer(**kwargs)
        use_atomic_checkpoint_io(trainer.strategy)
        use_step_progress_bar(trainer, configured)
        return trainer


PREDICT_REMOVED = ("`predict` is not a subcommand of main.py (its subcommands: fit, validate, test). Generate text "
                   "from a checkpoint with `python -m nsa_lit.generate --ckpt_path P --prompt_file F` "
                   "(docs/decoding.md); score it with `main.py validate` / `main.py test` or `python -m nsa_lit.eval`")


def _subcommand(argv) -> str | None:
    """The first positional argument of a ``main.py`` command line (after ``-c/--config FILE`` and flags)."""
    args = iter(argv)
    for arg in args:
        if arg in ("-c", "--config"):
            next(args, None)
        elif not str(arg).startswith("-"):
            return str(arg)
    return None


def version_loggers_by_seed(config) -> None:
    """Give every configured logger (``trainer.logger``: one ``class_path`` / ``init_args``
    namespace or a list of them) whose ``version`` is unset the version ``seed<k>``, ``k`` being
    ``seed_everything`` (an int by now: LightningCLI has drawn a ``true`` seed). Loggers given
    as ``true`` / ``false``, with an explicit version, or a run with ``seed_everything: false``
    are left as they are."""
    seed = config.get("seed_everything")
    trainer = config.get("trainer") or {}
    loggers = trainer.get("logger")
    if isinstance(seed, bool) or not isinstance(seed, int) or loggers in (None, True, False):
        return
    for logger in loggers if isinstance(loggers, list) else [loggers]:
        init_args = getattr(logger, "init_args", None)
        if init_args is not None and "version" in init_args and init_args["version"] is None:
            init_args["version"] = f"seed{seed}"


def _is_model_parallel(strategy) -> bool:
    """Whether the configured ``trainer.strategy`` (a name, a ``class_path`` namespace or an
    instance) is a ``ModelParallelStrategy``."""
    if isinstance(strategy, ModelParallelStrategy):
        return True
    if isinstance(strategy, str):  # a name in Lightning's registry, e.g. "fsdp2"
        cls = StrategyRegistry[strategy]["strategy"] if strategy in StrategyRegistry else None
        return isinstance(cls, type) and issubclass(cls, ModelParallelStrategy)
    class_path = getattr(strategy, "class_path", None)
    if not isinstance(class_path, str) or "." not in class_path:
        return False
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return False  # jsonargparse reports a bad class_path when it instantiates it
    return isinstance(cls, type) and issubclass(cls, ModelParallelStrategy)


def cli_main(args=None, run: bool = True) -> NSALightningCLI:
    """``args`` as on the command line (default: ``sys.argv``); ``run=False`` only builds."""
    return NSALightningCLI(
        LanguageModel, TokenDataModule, seed_everything_default=1234,
        save_config_kwargs={"overwrite": True}, args=args, run=run,
    )
