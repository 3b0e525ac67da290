"""LightningCLI entry point: ``python main.py {fit,validate} --config ...``.

``test`` and ``predict`` are LightningCLI's too but stop with Lightning's error (no test step, no
predict loader); generate text with ``python -m nsa_lit.generate``."""
from __future__ import annotations

import os

os.environ.setdefault("LITDATA_DISABLE_VERSION_CHECK", "1")

from lightning.pytorch.cli import LightningCLI  # noqa: E402

from nsa_lit.data import TokenDataModule  # noqa: E402
from nsa_lit.lit_module import LanguageModel  # noqa: E402


class NSALightningCLI(LightningCLI):
    """The model's context length is the data's sequence length: ``data.seq_len`` follows
    ``model.arch.seq_len``. Options must be spelled out: argparse's prefix matching would take
    ``--model.arch.n_head`` for ``--model.arch.n_heads``; here it is an error."""

    def init_parser(self, **kwargs):
        return super().init_parser(**{"allow_abbrev": False, **kwargs})

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("model.arch.seq_len", "data.seq_len")


def cli_main(args=None, run: bool = True) -> NSALightningCLI:
    """``args`` as on the command line (default: ``sys.argv``); ``run=False`` only builds."""
    return NSALightningCLI(
        LanguageModel, TokenDataModule, seed_everything_default=1234,
        save_config_kwargs={"overwrite": True}, args=args, run=run,
    )
