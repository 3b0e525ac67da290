"""Train and evaluate NSA / ASA language models: ``python main.py fit --config configs/tiny.yaml``."""
from nsa_lit.cli import cli_main

if __name__ == "__main__":
    cli_main()
