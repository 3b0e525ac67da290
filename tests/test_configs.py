"""Experiment configs: generated files are current, every config builds, the CLI reads them."""
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from nsa_lit.config import ModelConfig
from nsa_lit.lit_module import OptimConfig
from nsa_lit.model_stats import load_model_config

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "configs"))
import make_configs  # noqa: E402

ALL = sorted((ROOT / "configs").rglob("*.yaml"))


def test_generated_configs_are_current():
    expected = make_configs.expected_files()
    on_disk = {p for p in ALL if p.parent != ROOT / "configs"}
    assert on_disk == set(expected), "run: python configs/make_configs.py"
    for path, text in expected.items():
        assert path.read_text() == text, f"{path} differs from its table: python configs/make_configs.py"


@pytest.mark.parametrize("path", ALL, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_every_config_builds(path):
    doc = yaml.safe_load(path.read_text())
    ModelConfig(**doc["model"]["arch"])
    OptimConfig(**doc["model"].get("optim", {}))
    assert load_model_config(path) == ModelConfig(**doc["model"]["arch"])


def test_paper_variants_differ_only_where_they_should():
    asa = load_model_config(ROOT / "configs/340m/asa.yaml")
    assert (asa.layer_pattern, asa.local_kv, asa.global_kv, asa.global_latent_groups, asa.q_share) == \
        ("LG", "latent", "latent", 2, 4)
    assert load_model_config(ROOT / "configs/340m/asa_no_q_share.yaml").q_share == 1
    assert load_model_config(ROOT / "configs/340m/asa_global_mla.yaml").global_latent_groups == 1
    assert load_model_config(ROOT / "configs/340m/nsa.yaml").layer_pattern == "N"
    assert load_model_config(ROOT / "configs/340m/full.yaml").layer_pattern == "F"


def run_cli(*args):
    return subprocess.run([sys.executable, str(ROOT / "main.py"), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def test_print_config_shows_every_field():
    out = run_cli("fit", "--config", "configs/tiny.yaml", "--print_config")
    assert out.returncode == 0, out.stderr
    doc = yaml.safe_load(out.stdout)
    assert set(doc["model"]["arch"]) == set(ModelConfig.__dataclass_fields__)
    assert doc["model"]["arch"]["seq_len"] == 256
    assert "seq_len" not in doc["data"]  # linked: data.seq_len follows model.arch.seq_len


def test_data_sequence_length_follows_the_model(monkeypatch):
    from nsa_lit.cli import cli_main

    monkeypatch.chdir(ROOT)
    cli = cli_main(["--config", "configs/tiny.yaml", "--model.arch.seq_len", "512",
                    "--trainer.logger", "false", "--trainer.callbacks", "[]"], run=False)
    assert cli.model.arch.seq_len == 512 and cli.datamodule.seq_len == 512


def test_cli_rejects_a_bad_field_by_name():
    out = run_cli("fit", "--config", "configs/tiny.yaml", "--model.arch.n_kv_heads", "3")
    assert out.returncode != 0
    assert "`n_kv_heads`" in out.stderr


def test_cli_rejects_abbreviated_options():
    """argparse's prefix matching would take ``--model.arch.n_head`` for ``n_heads``."""
    from nsa_lit.cli import cli_main

    with pytest.raises(SystemExit) as err:
        cli_main(["fit", "--config", str(ROOT / "configs/tiny.yaml"), "--model.arch.n_head", "8",
                  "--print_config"])
    assert err.value.code != 0
    ok = run_cli("fit", "--config", "configs/tiny.yaml", "--model.arch.n_heads", "8",
                 "--print_config")
    assert ok.returncode == 0 and yaml.safe_load(ok.stdout)["model"]["arch"]["n_heads"] == 8
