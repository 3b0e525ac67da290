"""The lm-evaluation-harness adapter (nsa_lit/eval/lm_eval_adapter.py), offline, through the real
harness: local JSON tasks (a multiple-choice task and a loglikelihood_rolling task) loaded with
``TaskManager(include_path=...)``, a tiny random model, and every number the harness reports
recomputed here directly from the model's log-softmax."""
import json
import math
import random
import re

import pytest
import torch

from nsa_lit.data import load_tokenizer
from nsa_lit.data.tokenizer import train_bpe
from nsa_lit.eval.__main__ import main
from nsa_lit.eval.lm_eval_adapter import NsaLitLM, TaskDataError, evaluate, load_tasks
from nsa_lit.generate import generate
from nsa_lit.model import Transformer
from test_decode import train_tiny_checkpoint
from test_model import config

WORDS = ("red green blue cat dog bird runs sleeps eats fish apple the a is on under tree house "
         "big small quickly slowly").split()


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tok")
    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(12)) + "?\nAnswer:" for _ in range(300)]
    train_bpe("bpe:300", iter(texts), tmp)
    return tmp


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return load_tokenizer("bpe:300", tokenizer_dir)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Transformer(config("asa", vocab_size=320, seq_len=64)).double().eval()


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    """Two local tasks: ``tiny_mc`` (3 choices, 12 questions) and ``tiny_ppl`` (rolling
    log-likelihood of 4 documents, two longer than the model's 64-token context)."""
    tmp = tmp_path_factory.mktemp("tasks")
    rng = random.Random(1)
    with open(tmp / "mc.jsonl", "w") as f:
        for _ in range(12):
            doc = {"question": " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9))),
                   "choices": [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 4)))
                               for _ in range(3)],
                   "label": rng.randrange(3)}
            f.write(json.dumps(doc) + "\n")
    with open(tmp / "ppl.jsonl", "w") as f:
        for n in (5, 30, 90, 150):
            f.write(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(n))}) + "\n")
    (tmp / "tiny_mc.yaml").write_text(f"""task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {tmp / 'mc.jsonl'}
output_type: multiple_choice
validation_split: validation
doc_to_text: "Question: {{{{question}}}}?\\nAnswer:"
doc_to_target: label
doc_to_choice: choices
metric_list:
  - metric: acc
metadata:
  version: 1.0
""")
    (tmp / "tiny_ppl.yaml").write_text(f"""task: tiny_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {tmp / 'ppl.jsonl'}
output_type: loglikelihood_rolling
validation_split: validation
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
metadata:
  version: 1.0
""")
    return tmp


@pytest.fixture(scope="module")
def task_manager(task_dir):
    from lm_eval.tasks import TaskManager

    # lm-eval's own tasks left out: indexing them takes seconds (the command does the same when
    # --include_path defines every task asked for)
    return TaskManager(include_path=str(task_dir), include_defaults=False)


@torch.no_grad()
def direct_logprob(model, context: list[int], continuation: list[int]) -> float:
    """One unpadded forward of context + continuation: the sum of the continuation's
    log-softmax entries (float64)."""
    full = context + continuation
    logp = model(torch.tensor([full[:-1]]))[0].double().log_softmax(-1)
    n = len(continuation)
    return float(logp[-n:].gather(-1, torch.tensor(full[-n:])[:, None]).sum())


def harness_split(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """The harness' causal encoding: trailing context spaces go to the continuation, whose tokens
    are those of context + continuation after the context's."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer.encode(context + continuation)
    ctx = tokenizer.encode(context)
    return ctx, whole[len(ctx):]


@torch.no_grad()
def direct_rolling(model, tokenizer, text: str) -> float:
    """Every token of ``[eos] + text`` scored once: predictions in chunks of ``seq_len``, each
    chunk read with as much context as fits (the last chunk too)."""
    seq = [tokenizer.eos_id] + tokenizer.encode(text)
    T = model.cfg.seq_len
    total = 0.0
    for a in range(1, len(seq), T):  # targets seq[a:b]
        b = min(a + T, len(seq))
        start = max(0, b - 1 - T)
        logp = model(torch.tensor([seq[start: b - 1]]))[0].double().log_softmax(-1)
        total += float(logp[-(b - a):].gather(-1, torch.tensor(seq[a:b])[:, None]).sum())
    return total


def test_multiple_choice_and_rolling_through_the_harness(model, tokenizer, task_manager, task_dir):
    lm = NsaLitLM(model=model, tokenizer=tokenizer, batch_size=3, progress=False)
    out = evaluate(lm, ["tiny_mc", "tiny_ppl"], task_manager, log_samples=True)
    # multiple choice: every choice's log-likelihood is the direct one; accuracy follows
    docs = [json.loads(line) for line in (task_dir / "mc.jsonl").read_text().splitlines()]
    samples = sorted(out["samples"]["tiny_mc"], key=lambda s: s["doc_id"])
    assert len(samples) == len(docs) == 12
    correct = []
    for doc, sample in zip(docs, samples):
        context = f"Question: {doc['question']}?\nAnswer:"
        direct = [direct_logprob(model, *harness_split(tokenizer, context, " " + c))
                  for c in doc["choices"]]
        got = [resp[0] for resp in sample["filtered_resps"]]
        assert got == pytest.approx(direct, abs=1e-9)
        correct.append(max(range(3), key=lambda k: direct[k]) == doc["label"])
    assert out["results"]["tiny_mc"]["acc,none"] == pytest.approx(sum(correct) / len(correct))
    # rolling: each document's total equals the direct chunked computation; word perplexity too
    texts = [json.loads(line)["text"] for line in (task_dir / "ppl.jsonl").read_text().splitlines()]
    assert max(len(tokenizer.encode(t)) for t in texts) > 2 * model.cfg.seq_len  # several windows
    samples = sorted(out["samples"]["tiny_ppl"], key=lambda s: s["doc_id"])
    direct = [direct_rolling(model, tokenizer, t) for t in texts]
    assert [s["filtered_resps"][0] for s in samples] == pytest.approx(direct, abs=1e-8)
    words = sum(len(re.split(r"\s+", t)) for t in texts)
    assert out["results"]["tiny_ppl"]["word_perplexity,none"] == \
        pytest.approx(math.exp(-sum(direct) / words), rel=1e-9)


def test_rolling_windows_cover_every_token_once(model, tokenizer):
    lm = NsaLitLM(model=model, tokenizer=tokenizer, progress=False)
    text = " ".join(WORDS * 8)
    ids = tokenizer.encode(text)
    windows = lm.rolling_windows(text)
    assert [t for _, cont in windows for t in cont] == ids
    assert all(len(ctx) + len(cont) - 1 <= model.cfg.seq_len for ctx, cont in windows)
    assert len(windows[-1][0]) + len(windows[-1][1]) - 1 == model.cfg.seq_len  # full context


def test_generate_until_is_greedy_and_stops(model, tokenizer):
    from lm_eval.api.instance import Instance

    lm = NsaLitLM(model=model, tokenizer=tokenizer, batch_size=2, progress=False)
    prompts = ["the cat is", "a big dog runs on the", "red"]
    expected = [tokenizer.decode([t for t in generate(model, [tokenizer.encode(p)], 6,
                                                      eos_id=tokenizer.eos_id)[0]
                                  if t != tokenizer.eos_id]) for p in prompts]
    requests = [Instance("generate_until", {}, (p, {"until": [], "max_gen_toks": 6}), i)
                for i, p in enumerate(prompts)]
    assert lm.generate_until(requests) == expected
    stop = expected[1][len(expected[1]) // 2:][:2]  # a stop sequence inside the second answer
    assert stop
    requests[1] = Instance("generate_until", {},
                           (prompts[1], {"until": [stop], "max_gen_toks": 6}), 1)
    cut = lm.generate_until(requests)
    assert cut[1] == expected[1].split(stop, 1)[0] and cut[0] == expected[0]
    with pytest.raises(ValueError, match="only greedy"):
        lm.generate_until([Instance("generate_until", {}, ("a", {"do_sample": True}), 0)])


def test_registered_and_refuses_a_larger_tokenizer(model, tokenizer):
    from lm_eval.api.registry import get_model

    assert get_model("nsa-lit") is NsaLitLM
    small = Transformer(config("asa", vocab_size=97, seq_len=64))
    with pytest.raises(ValueError, match="300 tokens, more than the model's vocab_size \\(97\\)"):
        NsaLitLM(model=small, tokenizer=tokenizer)


def test_missing_dataset_names_the_task(task_manager, task_dir, tmp_path):
    from lm_eval.tasks import TaskManager

    (tmp_path / "gone.yaml").write_text(
        (task_dir / "tiny_mc.yaml").read_text().replace("task: tiny_mc", "task: tiny_gone")
        .replace(str(task_dir / "mc.jsonl"), str(tmp_path / "missing.jsonl")))
    manager = TaskManager(include_path=str(tmp_path), include_defaults=False)
    with pytest.raises(TaskDataError, match="lm-eval task 'tiny_gone'.*HF_DATASETS_CACHE"):
        load_tasks(["tiny_gone"], manager)
    with pytest.raises(ValueError, match="unknown lm-eval task\\(s\\) no_such_task"):
        load_tasks(["no_such_task"], task_manager)


@pytest.fixture(scope="module")
def checkpoint(tokenizer_dir, tmp_path_factory):
    return train_tiny_checkpoint(tmp_path_factory.mktemp("ckpt"), "bpe:300", tokenizer_dir, vocab_size=320,
                                 seq_len=64, steps=1)[0]


def test_command_writes_results_and_table(checkpoint, task_dir, tmp_path, capsys):
    out = tmp_path / "res.json"
    result = main(["lm-eval", "--ckpt_path", str(checkpoint), "--tasks", "tiny_mc,tiny_ppl",
                   "--include_path", str(task_dir), "--limit", "5", "--batch_size", "4",
                   "--output_path", str(out), "--device", "cpu", "--no_progress", "--log_samples"])
    saved = json.loads(out.read_text())
    assert set(saved["results"]) == {"tiny_mc", "tiny_ppl"}
    assert saved["results"]["tiny_mc"]["acc,none"] == result["results"]["tiny_mc"]["acc,none"]
    assert saved["meta"]["ckpt_path"] == str(checkpoint) and saved["meta"]["limit"] == 5
    assert len(saved["samples"]["tiny_mc"]) == 5  # --limit
    from nsa_lit.compare.runs import read_eval  # the comparison tool reads the file as it is

    meta, scores = read_eval(out)
    assert meta["ckpt_path"] == str(checkpoint)
    assert scores["tiny_mc acc"]["accuracy"] == saved["results"]["tiny_mc"]["acc,none"]
    printed = capsys.readouterr().out
    assert "tiny_mc" in printed and "word_perplexity" in printed
    # the registry path: lm_eval builds the model from model_args and its own settings
    from lm_eval.api.registry import get_model

    lm = get_model("nsa-lit").create_from_arg_string(
        f"ckpt_path={checkpoint},progress=False",
        {"batch_size": 2, "max_batch_size": None, "device": "cpu"})
    assert lm.batch_size == 2 and lm.max_length == 64 and lm.tokenizer.spec == "bpe:300"
    assert lm.progress is False
