"""The benchmark scripts' CPU-checkable parts: a decode smoke run and argument checks."""
import dataclasses
import json
import math
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import attention  # noqa: E402
import decode  # noqa: E402


def test_decode_benchmark_runs_on_cpu(tmp_path, capsys):
    out = tmp_path / "decode.json"
    decode.main(["--configs", str(ROOT / "configs/tiny.yaml"), "--contexts", "96",
                 "--batches", "2", "--steps", "2", "--warmup", "1", "--device", "cpu",
                 "--out", str(out)])
    record = json.loads(out.read_text())
    (row,) = record["results"]
    assert row["context"] == 96 and row["batch"] == 2 and row["mode"] == "eager"
    assert row["tokens_per_sec"] > 0
    assert row["cache_bytes"] > 0 and "tokens/s" in capsys.readouterr().out
    assert row["step_weight_bytes"] > 0  # built by the first step


def test_decode_benchmark_runs_nsa_with_per_branch_key_values(tmp_path):
    import yaml

    config = yaml.safe_load((ROOT / "configs/tiny.yaml").read_text())
    config["model"]["arch"].update(layer_pattern="N", nsa_kv="per_branch")
    path = tmp_path / "nsa_per_branch.yaml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "decode.json"
    decode.main(["--configs", str(path), "--contexts", "96", "--batches", "1", "--steps", "2",
                 "--warmup", "1", "--device", "cpu", "--out", str(out)])
    (row,) = json.loads(out.read_text())["results"]
    assert row["tokens_per_sec"] > 0 and row["cache_bytes"] > 0


def test_decode_benchmark_passes_compile_options_and_reports_failures(tmp_path):
    """``--compile_options`` reaches Inductor and is recorded; a run that raises (here an option
    Inductor does not know) is recorded as an error row and the exit status is 1."""
    out = tmp_path / "decode.json"
    base = ["--configs", str(ROOT / "configs/tiny.yaml"), "--contexts", "96", "--batches", "1",
            "--steps", "2", "--warmup", "1", "--device", "cpu", "--modes", "compiled",
            "--out", str(out)]
    assert decode.main(base + ["--compile_options", '{"combo_kernels": true}']) == 0
    (row,) = json.loads(out.read_text())["results"]
    assert row["compile_options"] == {"combo_kernels": True} and row["tokens_per_sec"] > 0
    assert decode.main(base + ["--compile_options", '{"no_such_option": 1}']) == 1
    (row,) = json.loads(out.read_text())["results"]
    assert "no_such_option" in row["error"] and "tokens_per_sec" not in row


def test_decode_benchmark_refuses_graphs_without_cuda():
    with pytest.raises(SystemExit, match="graph needs CUDA"):
        decode.main(["--device", "cpu", "--modes", "graph"])


def test_attention_benchmark_gives_each_output_a_dense_gradient():
    import torch

    a, b = torch.zeros(2, 3), torch.zeros(4)
    ga, gb = attention.output_grads((a, b))
    assert ga.shape == a.shape and gb.shape == b.shape and ga.stride() == a.stride()
    assert attention.output_grads(a).shape == a.shape


@pytest.mark.parametrize("argv, message", [
    (["--sweep", "--variants", "dkdv_s2,no_such"], "--variants: unknown ['no_such']"),
    (["--variants", "dkdv_s2"], "--variants needs --sweep"),
])
def test_selected_attention_benchmark_names_a_bad_variant(argv, message, capsys):
    """The variant filter fails before any GPU work, naming the bad value."""
    import bench_selected_attention as bench
    with pytest.raises(SystemExit):
        bench._bench_main(argv)
    assert message in capsys.readouterr().err


def test_selected_attention_benchmark_has_the_wide_1_3b_layout():
    """The 1.3B ASA global layer's selected attention (keys over 256 columns) is a layout of its
    own, outside the default run, with variants that time the WIDE tiling against the ones
    that spill."""
    import bench_selected_attention as bench

    assert bench.BENCH_LAYOUTS["gla_1.3b_absorbed_vk"] == (32, 2, 2, 288, 256, 4)
    assert "gla_1.3b_absorbed_vk" not in bench.DEFAULT_LAYOUTS
    assert set(bench.DEFAULT_LAYOUTS) < set(bench.BENCH_LAYOUTS)
    names = {name for name, _, _ in bench._bench_variants("gla_1.3b_absorbed_vk")}
    assert {"two_accs", "rows32", "bk64", "narrow_tiles", "warps8"} < names
    assert "two_accs" not in {name for name, _, _ in bench._bench_variants("gla_absorbed_vk")}


def test_attention_cases_are_valid_configs_at_every_default_length():
    """Every case is built from a config (no restated shapes); each is valid at every T."""
    for case in attention.CASES:
        for T in attention.DEFAULT_T:
            spec = attention.layer_spec(case.cfg, case.kind, T)
            assert spec.kind == case.kind and spec.branches, case.name


@pytest.mark.parametrize("latent_form", ["auto", "absorbed", "expanded"])
@pytest.mark.parametrize("pattern, kind", [("LG", "G"), ("LG", "L"), ("N", "N"), ("F", "F")])
def test_branch_benchmark_inputs_are_what_the_layer_passes(monkeypatch, pattern, kind,
                                                           latent_form):
    """``branches_case`` times ``run_branches`` on inputs of the shapes, forms and value layout
    (values in the keys for absorbed forms) that the layer itself passes it."""
    import torch

    import nsa_lit.attention.layer as layer_module
    from nsa_lit.attention import Attention
    from nsa_lit.config import ModelConfig

    cfg = ModelConfig(vocab_size=97, n_layers=2, d_model=32, n_heads=4, head_dim=8, n_kv_heads=2,
                      mlp_hidden=64, seq_len=64, latent_dim=16, rope_dim=4, window=12,
                      compress_block=8, compress_stride=4, select_block=8, top_n=3,
                      num_local_blocks=1, q_share=4, layer_pattern=pattern,
                      latent_form=latent_form, kernel_backend="reference")
    seen = {}
    real = layer_module.run_branches

    def spy(spec, inputs, backend="auto"):
        seen.update(inputs)
        return real(spec, inputs, backend)

    monkeypatch.setattr(layer_module, "run_branches", spy)
    Attention(cfg, kind)(torch.randn(2, 64, 32))
    monkeypatch.setattr(attention, "DEVICE", "cpu")
    built, leaves = attention.branch_inputs(cfg.layer(kind), 2, 64)

    def layout(inp):
        shapes = {f: None if getattr(inp, f) is None else tuple(getattr(inp, f).shape)
                  for f in ("q", "k", "v", "k_cmp", "v_cmp")}
        return shapes, inp.values_in_keys

    assert {f: layout(i) for f, i in built.items()} == {f: layout(i) for f, i in seen.items()}
    for inp in built.values():
        if inp.values_in_keys and inp.v is not None:
            assert inp.v.data_ptr() == inp.k.data_ptr()
    assert all(t.requires_grad for t in leaves)


@pytest.mark.slow
def test_fit_throughput_runs_the_real_cli_and_reads_the_figures_back(tmp_path, monkeypatch):
    """``fit_throughput.py`` trains through ``main.py fit`` and times only the steps after the
    warm-up: on CPU, the tiny config for 1 + 2 steps."""
    import fit_throughput

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "fit.json"
    fit_throughput.main(["--configs", str(ROOT / "configs/tiny.yaml"), "--steps", "2",
                         "--warmup", "1", "--synthetic_dir", str(tmp_path / "data"),
                         "--extra", "--trainer.accelerator cpu --data.num_workers 0",
                         "--out", str(out)])
    (row,) = json.loads(out.read_text())["results"]
    assert row["config"] == "configs/tiny.yaml" and row["T"] == 256 and row["timed_steps"] == 2
    assert row["tokens_per_sec"] == pytest.approx(2 * 8 * 256 / row["seconds"])
    assert row["logged"]["train/tokens_per_sec"] > 0 and "train/loss" in row["logged"]
    assert row["progress_bar"]  # as main.py fit shows it
    # synthetic data holding (1 + 2 + 1) steps of 8 sequences: no epoch boundary in the timing
    assert row["epochs_crossed"] == 0 and row["data"] == f"synthetic, {4 * 8 * 256 + 1:,} tokens"
    # a prepared dataset whose epoch is shorter than the run: the crossing is flagged
    small = fit_throughput.synthetic_data(str(tmp_path / "small"), 10, 256, "bpe:4096")[0]
    fit_throughput.main(["--configs", str(ROOT / "configs/tiny.yaml"), "--steps", "2",
                         "--warmup", "1", "--data_dir", small, "--no_progress_bar",
                         "--extra", "--trainer.accelerator cpu --data.num_workers 0",
                         "--out", str(out)])
    (row,) = json.loads(out.read_text())["results"]
    assert row["epochs_crossed"] >= 1 and row["data"] == small and not row["progress_bar"]


def test_fit_throughput_refuses_a_run_shorter_than_its_warmup():
    import fit_throughput

    with pytest.raises(SystemExit, match="--steps and --warmup must be >= 1"):
        fit_throughput.main(["--steps", "0"])


@pytest.mark.slow
def test_loss_check_repeats_exactly_on_cpu_and_catches_a_changed_run(tmp_path, monkeypatch, capsys):
    """``loss_check.py``: 3 steps of the tiny config (2 micro-batches of 2 sequences each) twice
    in fp32 on CPU repeat exactly (noise 0); the same run passes against that record; a run with
    another learning rate is reported as changed (exit 1) from its second step on. The runs read
    random tokens of the config's vocabulary, made here: the check does not depend on what the
    tokens say, and the embedded corpus is not tokenized for it."""
    import fit_throughput
    import loss_check

    monkeypatch.chdir(tmp_path)
    data, _ = fit_throughput.synthetic_data(str(tmp_path / "data"), 3 * 2 * 2, 256, "bpe:4096")
    common = ["--config", str(ROOT / "configs/tiny.yaml"), "--steps", "3", "--data_dir", data]
    cpu = ("--trainer.accelerator cpu --data.num_workers 0 --trainer.accumulate_grad_batches 2 "
           "--data.batch_size 2")
    ref = tmp_path / "ref.json"
    assert loss_check.main([*common, "--repeat", "2", "--extra", cpu, "--out", str(ref)]) == 0
    record = json.loads(ref.read_text())
    assert len(record["losses"]) == 3 and record["noise"] == 0.0
    assert [r["losses"] for r in record["results"]] == [record["losses"]] * 2
    # the step's loss itself (not divided by the accumulation): near ln(4096) at the start
    assert abs(record["losses"][0] - math.log(4096)) < 1.0
    assert loss_check.main([*common, "--extra", cpu, "--reference", str(ref)]) == 0
    changed = tmp_path / "changed.json"
    assert loss_check.main([*common, "--extra", cpu + " --model.optim.lr 0.03", "--reference", str(ref),
                            "--out", str(changed)]) == 1
    verdict = json.loads(changed.read_text())["reference"]
    assert not verdict["passed"] and verdict["rtol"] == 1e-6 and verdict["worst_step"] >= 2
    assert "CHANGED" in capsys.readouterr().out


def test_forward_backward_flops_count_each_kind_of_work_once(monkeypatch):
    """Attention's backward counts 2.5 forwards, matrix products 2, the block scoring (no
    gradient) none: a sparse case's and a layer case's figures add up from those parts."""
    from nsa_lit.model_stats import attention_flop_parts, matmul_flops_per_token

    assert attention.fwd_bwd_flops(attention=2.0, matmul=5.0, scoring=7.0) == 2.0 * 3.5 + 15.0 + 7.0
    monkeypatch.setattr(attention, "DEVICE", "cpu")
    T, B = 64, 2
    by_name = {c.name: c for c in attention.CASES}
    for name in ("asa-global", "layer-asa-global"):
        case = by_name[name]
        cfg = dataclasses.replace(case.cfg, d_model=64, n_heads=4, head_dim=16, latent_dim=32,
                                  rope_dim=8, mlp_hidden=64, seq_len=T, window=16,
                                  compress_block=8, compress_stride=4, select_block=8, top_n=3,
                                  num_local_blocks=1, kernel_backend="reference")
        bench = (attention.branches_case if name == "asa-global" else attention.layer_case)(
            cfg, "G")(T, B)
        spec = attention.layer_spec(cfg, "G", T)
        trained, scoring = attention_flop_parts(spec, T)
        matmul = 0.0
        if name.startswith("layer"):
            from nsa_lit.attention import Attention

            matmul = matmul_flops_per_token(Attention(cfg, "G"))
        assert bench.flops_fwd == pytest.approx((trained + scoring + matmul) * B * T)
        assert bench.flops_fwd_bwd == pytest.approx((3.5 * trained + scoring + 3 * matmul) * B * T)
        assert scoring > 0


def test_speed_check_runs_the_parts_asked_for_and_reports_failures(tmp_path):
    """``speed_check.sh OUT PARTS`` runs only PARTS' commands, every one even after a failure,
    and exits non-zero when any failed (a stand-in ``python3`` records the commands)."""
    import shlex
    import subprocess

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.txt"
    fake = bin_dir / "python3"
    # one line per call, its arguments quoted as the shell would need them
    fake.write_text(f'#!/bin/bash\nprintf "%q " "$@" >> {log}; echo >> {log}\n'
                    'case "$*" in *decode.py*) exit 1;; esac\n')
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    script = ROOT / "benchmarks" / "speed_check.sh"

    def speed_check(parts: str) -> tuple[int, list[list[str]]]:
        if log.exists():
            log.unlink()
        done = subprocess.run(["bash", str(script), str(tmp_path / "out"), parts], env=env,
                              capture_output=True, text=True)
        return done.returncode, [shlex.split(call) for call in log.read_text().splitlines()]

    def program(words: list[str]) -> str:  # what a python3 call ran: a script, or -m's module
        return words[1] if words[0] == "-m" else words[0]

    def option(words: list[str], name: str) -> list[str]:  # an option's values
        i = words.index(name) + 1
        end = next((j for j in range(i, len(words)) if words[j].startswith("--")), len(words))
        return words[i:end]

    rc, calls = speed_check("decode,loss")
    assert [program(c) for c in calls] == ["benchmarks/decode.py", "benchmarks/decode.py",
                                           "pytest", "benchmarks/loss_check.py"], calls
    assert "--kernels" in calls[0] and option(calls[0], "--modes") == ["compiled"]
    assert option(calls[0], "--batches") == ["1"] and "configs/340m/full.yaml" in calls[0]
    assert option(calls[1], "--batches") == ["64"] and "configs/340m/nsa.yaml" in calls[1]
    assert option(calls[3], "--repeat") == ["2"]
    assert rc == 1  # decode.py failed; the loss check still ran

    rc, calls = speed_check("fit,fit_more,fit_32k,profile")
    assert rc == 0
    assert [program(c) for c in calls] == ["benchmarks/fit_throughput.py", "pytest"] + [
        "benchmarks/fit_throughput.py"] * 2 + ["benchmarks/train_throughput.py"], calls
    fits = [c for c in calls if program(c) == "benchmarks/fit_throughput.py"]
    assert [option(c, "--configs") for c in fits] == [
        ["configs/340m/asa.yaml", "configs/340m/full.yaml"],
        ["configs/340m/nsa.yaml", "configs/1.3b/asa.yaml"],
        ["configs/340m/asa.yaml", "configs/340m/full.yaml", "configs/340m/nsa.yaml"]]
    assert all("--raw" in c for c in fits)
    # the 32k runs' overrides reach fit_throughput as one --extra value argparse accepts
    extras = [next(w for w in c if w.startswith("--extra=")) for c in fits]
    assert extras[:2] == ["--extra=", "--extra="]
    assert extras[2] == "--extra=--model.arch.seq_len 32768 --data.batch_size 1"
    assert "hf-llama" in option(calls[-1], "--configs") and "--profile" in calls[-1]
    for part in ("fit-8k", "fit-8k-more", "fit-32k"):
        assert any(option(c, "--out") == [str(tmp_path / "out" / f"{part}.json")] for c in fits)


def test_decode_benchmark_sets_and_records_decode_launch_overrides(tmp_path, monkeypatch):
    from kernels.decode import triton_kernel as tk

    monkeypatch.setattr(tk, "CONFIG_OVERRIDE", {})
    out = tmp_path / "decode.json"
    decode.main(["--configs", str(ROOT / "configs/tiny.yaml"), "--contexts", "32",
                 "--batches", "1", "--steps", "1", "--warmup", "1", "--device", "cpu",
                 "--decode_config", '{"MIN_KEYS_PER_SPLIT": 512}', "--out", str(out)])
    assert tk.CONFIG_OVERRIDE == {"MIN_KEYS_PER_SPLIT": 512}
    assert json.loads(out.read_text())["decode_config"] == {"MIN_KEYS_PER_SPLIT": 512}


def test_decode_benchmark_sets_and_records_the_merged_weights_batch(tmp_path, monkeypatch):
    from nsa_lit.attention import layer

    monkeypatch.setattr(layer, "MERGED_UP_PROJECTIONS_MIN_BATCH", 1)
    out = tmp_path / "decode.json"
    argv = ["--configs", str(ROOT / "configs/tiny.yaml"), "--contexts", "32", "--batches", "1",
            "--steps", "1", "--warmup", "1", "--device", "cpu", "--out", str(out)]
    decode.main(argv + ["--merged_min_batch", "4"])
    assert layer.MERGED_UP_PROJECTIONS_MIN_BATCH == 4
    assert json.loads(out.read_text())["merged_min_batch"] == 4
    with pytest.raises(SystemExit, match="merged_min_batch must be >= 1"):
        decode.main(argv + ["--merged_min_batch", "0"])


# every Triton kernel under kernels/, by module: the group its GPU time is reported under
_KERNEL_MODULE_GROUPS = {"compression": "compression attention",
                         "selected_attention": "selected attention",
                         "selection": "block selection", "sliding_window": "window attention",
                         "cross_entropy": "loss", "decode": "decode attention"}


@pytest.mark.parametrize("module, group", sorted(_KERNEL_MODULE_GROUPS.items()))
def test_profiled_kernels_are_grouped_by_the_branch_that_launches_them(module, group):
    import re

    import kernel_time

    source = (ROOT / "kernels" / module / "triton_kernel.py").read_text()
    names = re.findall(r"@triton\.jit\s*\ndef (\w+kernel)\(", source)
    assert names, f"no Triton kernel found in kernels/{module}"
    for name in names:
        assert kernel_time.group_of(name) == group, name
    assert kernel_time.group_of("nvjet_sm90_tst_64x8_64x16_4x1_v_bz_TNT") == "matmul"
    assert kernel_time.group_of("triton_per_fused__fused_rms_norm_0") == "fused elementwise (Inductor)"
    assert kernel_time.group_of("pytorch_flash::flash_fwd_kernel<...>") == "SDPA / flash"
    assert kernel_time.group_of("something else") == "other"


def test_kernel_time_sums_gpu_events_per_kernel_and_group():
    from types import SimpleNamespace

    import kernel_time
    import train_throughput
    from torch.autograd import DeviceType

    def event(name, us, device=DeviceType.CUDA):
        return SimpleNamespace(name=name, time_range=SimpleNamespace(elapsed_us=lambda: us),
                               device_type=device)

    prof = SimpleNamespace(events=lambda: [
        event("_sel_fwd_kernel", 300.0), event("_sel_bwd_dq_kernel", 500.0),
        event("_sel_fwd_kernel", 100.0), event("aten::mm", 9e9, DeviceType.CPU),
        event("nvjet_sm90_tst_x", 1000.0), event("Memcpy DtoD (Device -> Device)", 5.0)])
    times = kernel_time.kernel_times(prof)
    assert times == {"_sel_fwd_kernel": (400.0, 2), "_sel_bwd_dq_kernel": (500.0, 1),
                     "nvjet_sm90_tst_x": (1000.0, 1), "Memcpy DtoD (Device -> Device)": (5.0, 1)}
    assert kernel_time.totals(times, per=2) == (pytest.approx(0.9525), 2.5)
    groups = kernel_time.by_group(times, per=2)
    assert list(groups) == ["matmul", "selected attention", "copies"]  # largest first
    assert groups["selected attention"] == {"ms": 0.45, "launches": 1.5}
    top = kernel_time.top_kernels(times, 2)
    assert top == [("nvjet_sm90_tst_x", "matmul", 1.0, 1), ("_sel_bwd_dq_kernel", "selected attention", 0.5, 1)]
    row = {"config": "configs/340m/asa.yaml", "T": 8192, "mode": "compiled", "ms_per_step": 2.5,
           "profile": {"gpu_ms": 1.905, "launches": 5, "groups": groups, "top": top}}
    table = train_throughput.profile_table(row)
    assert "1.9 GPU ms in 5 kernels" in table and "selected attention" in table
    assert "[matmul] nvjet_sm90_tst_x" in table


def test_decode_kernel_profile_reports_per_step_figures_in_kernel_times_format(monkeypatch):
    """``decode.py --kernels``: counts, milliseconds, groups and the costliest kernels per
    profiled step, the top list in ``kernel_time.top_kernels``' form (as train_throughput's)."""
    import torch

    times = {"_decode_kernel": (600.0, 6), "nvjet_sm90_tst_x": (300.0, 3), "triton_poi_x": (30.0, 9)}
    monkeypatch.setattr(decode, "kernel_times", lambda prof: times)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    calls = []

    def step(tokens):
        calls.append(tokens)
        return torch.zeros(2, 5)

    out = decode.kernel_profile(step, torch.zeros(2, dtype=torch.long), steps=3, top=2)
    assert len(calls) == 3
    assert out["kernels_per_step"] == 6 and out["kernel_ms_per_step"] == pytest.approx(0.31)
    assert out["kernel_groups"]["decode attention"] == {"ms": pytest.approx(0.2), "launches": 2}
    assert out["top_kernels"] == [("_decode_kernel", "decode attention", pytest.approx(0.2), 2),
                                  ("nvjet_sm90_tst_x", "matmul", pytest.approx(0.1), 1)]


def test_llama_baseline_has_our_full_models_shape_and_trains_through_the_same_loss():
    """``train_throughput.py``'s ``hf-llama``: transformers' Llama at the shape of a
    full-attention config has exactly our full model's parameter count, and the chunked loss the
    benchmark trains with equals cross-entropy of its logits."""
    pytest.importorskip("transformers")
    import torch

    import train_throughput
    from nsa_lit.loss import next_token_loss
    from nsa_lit.model import Transformer
    from test_model import config

    cfg = config("full")
    torch.manual_seed(0)
    llama = train_throughput.LlamaBaseline(cfg)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(llama) == count(Transformer(cfg))
    batch = torch.randint(0, cfg.vocab_size, (2, 17))
    logits = llama(batch[:, :-1])
    want = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
    torch.testing.assert_close(next_token_loss(llama, batch, 5), want)
    assert train_throughput.resolve("hf-llama") == (
        "hf-llama:configs/340m/full.yaml", train_throughput.LLAMA_SHAPE, True)
    assert train_throughput.resolve(str(ROOT / "configs/340m/asa.yaml"))[::2] == (
        "configs/340m/asa.yaml", False)
