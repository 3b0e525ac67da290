"""Train and evaluate NSA / ASA language models: ``python main.py {fit,validate,test} --config configs/tiny.yaml``
(``test`` scores a checkpoint on the held-out test split; generate text with ``python -m nsa_lit.generate``)."""
from nsa_lit.cli import cli_main

if __name__ == "__main__":
    cli_main()
