"""Long-context retrieval prompts (nsa_lit/eval/retrieval.py) and the niah command.

Tolerances: a needle starts at the haystack sentence boundary nearest to ``depth`` percent of
the haystack, so it sits within half the longest haystack sentence (MQAR: key-value pair) of the
requested token position, plus the distractor needles placed before it (multi-key NIAH). A
NIAH prompt plus its answer is at most the requested length and at most one sentence shorter;
an MQAR prompt keeps room for its queries, so it is at most ``MQAR_SHOWN + 2`` pairs shorter.
"""
import json

import pytest

from nsa_lit.checkpoint import load_checkpoint
from nsa_lit.data import load_tokenizer
from nsa_lit.data.tokenizer import train_bpe
from nsa_lit.eval import retrieval
from nsa_lit.eval.__main__ import main
from nsa_lit.generate import checkpoint_tokenizer
from test_decode import train_tiny_checkpoint

LENGTHS = [256, 512]
DEPTHS = [0, 25, 50, 75, 100]


TEMPLATES = [
    "There is a pass key hidden inside a lot of irrelevant text. Find it and memorize it. I will "
    "quiz you about the pass key. The pass key is 1234567. Remember it. 1234567 is the pass key. "
    "What is the pass key? The pass key is 7654321.",
    "A special magic number is hidden within the following text. Make sure to memorize it. I will "
    "quiz you about the number afterwards. Some special magic numbers are hidden. "
    "One of the special magic numbers for apple is: 8901234. What is the special magic number for "
    "apple mentioned in the provided text? The special magic number for apple mentioned in the "
    "provided text is 8901234. One of the special magic UUIDs for river is: "
    "c944093b-32ea-4d95-9bb9-b561acf1eae8.",
    "Memorize the value of each key. Then answer the queries. zebra-199: 3594073. Queries:",
]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A small BPE trained on the prompt templates and haystack sentences (byte fallback), so
    that a 256-token prompt holds a haystack."""
    tmp = tmp_path_factory.mktemp("tok")
    texts = list(retrieval.essay_sentences()[:3000]) + list(retrieval.NOISE) * 20
    train_bpe("bpe:600", iter(texts + TEMPLATES * 20), tmp)
    return tmp


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return load_tokenizer("bpe:600", tokenizer_dir)


def test_prompts_are_deterministic_from_the_seed(tokenizer):
    a = retrieval.build_samples(tokenizer, retrieval.TASKS, [256], [0, 50], 2, seed=0)
    b = retrieval.build_samples(tokenizer, retrieval.TASKS, [256], [0, 50], 2, seed=0)
    c = retrieval.build_samples(tokenizer, retrieval.TASKS, [256], [0, 50], 2, seed=1)
    assert [(s.prompt, s.answer, s.needle_pos) for s in a] == \
        [(s.prompt, s.answer, s.needle_pos) for s in b]
    for x, y in zip(a, c):
        assert x.prompt != y.prompt and x.answer != y.answer
    # the two samples of a cell differ too; a depth given as 50 or 50.0 is the same cell
    assert a[0].prompt != a[1].prompt
    d = retrieval.build_samples(tokenizer, retrieval.TASKS, [256], [0.0, 50.0], 2, seed=0)
    assert [s.prompt for s in a] == [s.prompt for s in d]


@pytest.mark.parametrize("task", retrieval.TASKS)
def test_needle_depth_and_haystack_length(tokenizer, task):
    for s in retrieval.build_samples(tokenizer, [task], LENGTHS, DEPTHS, 1, seed=3):
        total = len(s.prompt) + retrieval.answer_tokens(tokenizer, s)
        assert total <= s.length  # the length counts the answer, as RULER's does
        slack = s.max_piece * (retrieval.MQAR_SHOWN + 2 if task == "mqar" else 1)
        assert total > s.length - slack, (total, s.length, slack)
        text = tokenizer.decode(s.prompt[s.needle_pos:]).lstrip()
        if task == "mqar":
            assert text.startswith(f"{s.extra['key']}: {s.answer}.")
            filler, tolerance = s.haystack_tokens, s.max_piece  # depth 100: the last pair
            spread = 0
        else:
            needle = text[: text.index(s.answer) + len(s.answer) + 1]
            if task == "s-niah-1":
                needle = f"The pass key is {s.answer}. Remember it. {s.answer} is the pass key."
            assert text.startswith(needle)
            needles = retrieval.MK_NEEDLES if task == "mk-niah" else 1
            needle_tokens = len(tokenizer.encode(" " + needle))
            filler = s.haystack_tokens - needles * needle_tokens  # haystack sentences only
            # distractors placed before the needle push it by up to their length
            tolerance = s.max_piece / 2 + (needles - 1) * (needle_tokens + 4)
            spread = (needles - 1) * 4  # distractors up to 4 tokens longer: less filler
        target = s.haystack_start + s.depth / 100 * filler
        assert abs(s.needle_pos - target) <= tolerance + 1, (task, s.length, s.depth)
        half = s.max_piece if task == "mqar" else s.max_piece / 2
        assert abs(s.needle_depth - s.depth) <= 100 * half / (filler - spread) + 1e-9


def _fake_generate(tokenizer, samples, right: bool):
    answers = {tuple(s.prompt): s.answer for s in samples}
    calls = []

    def generate(model, prompts, max_new_tokens):
        calls.append((max_new_tokens, [tuple(p) for p in prompts]))
        out = []
        for p in prompts:
            answer = answers[tuple(p)]
            if not right:  # same length, one digit / character changed
                answer = answer[:-1] + ("0" if answer[-1] != "0" else "1")
            ids = tokenizer.encode(retrieval.space_prefix(tokenizer) + answer)
            out.append(ids + [tokenizer.eos_id] * (max_new_tokens - len(ids)))
        return out

    return generate, calls


@pytest.mark.parametrize("right", [True, False])
def test_exact_match_scoring(tokenizer, tmp_path, right):
    samples = retrieval.build_samples(tokenizer, retrieval.TASKS, [256], [0, 100], 2, seed=0)
    by_prompt = {tuple(s.prompt): s for s in samples}
    generate, calls = _fake_generate(tokenizer, samples, right)
    records = retrieval.evaluate(None, tokenizer, samples, batch_size=3, generate_fn=generate)
    assert [r["correct"] for r in records] == [right] * len(samples)
    # each batch generates exactly its prompts' answer tokens (answers of one length together)
    for budget, prompts in calls:
        assert {retrieval.answer_tokens(tokenizer, by_prompt[p]) for p in prompts} == {budget}
    assert sum(len(p) for _, p in calls) == len(samples)
    written = retrieval.write_outputs(tmp_path, {"model": "fake"}, records)
    for task in retrieval.TASKS:
        s = written["summary"][task]
        assert s["accuracy"] == float(right) and s["grid"]["0"]["256"] == float(right)
        assert (tmp_path / f"heatmap_{task}.txt").exists()
    saved = json.loads((tmp_path / "results.json").read_text())
    assert len(saved["records"]) == len(samples)
    assert retrieval.exact_match(" 123 ", "123") and not retrieval.exact_match("1234", "123")


def test_unknown_task_and_bad_depth_are_refused(tokenizer):
    with pytest.raises(ValueError, match="unknown task 'niah-9'"):
        retrieval.build_samples(tokenizer, ["niah-9"], [256], [0], 1, 0)
    with pytest.raises(ValueError, match="depth 120"):
        retrieval.build_samples(tokenizer, ["s-niah-1"], [256], [120], 1, 0)


@pytest.fixture(scope="module")
def checkpoint(tokenizer_dir, tmp_path_factory):
    return train_tiny_checkpoint(tmp_path_factory.mktemp("ckpt"), "bpe:600", tokenizer_dir, vocab_size=640,
                                 seq_len=512, data_vocab=600)[0]


def test_niah_command_end_to_end(checkpoint, tmp_path):
    args = ["niah", "--ckpt_path", str(checkpoint), "--lengths", "256,512", "--depths", "0,100",
            "--samples", "1", "--no_progress", "--device", "cpu"]
    first = main(args + ["--out", str(tmp_path / "a"), "--tb_dir", str(tmp_path / "tb")])
    a = json.loads((tmp_path / "a" / "results.json").read_text())
    # TensorBoard: every cell, each length's mean and each task's mean, at the checkpoint's step
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert len(tags) == len(retrieval.TASKS) * (2 * 2 + 2 + 1)
    for task in retrieval.TASKS:
        s = a["summary"][task]
        (mean,) = events.Scalars(f"eval/niah/{task}/mean")
        assert mean.value == pytest.approx(s["accuracy"]) and mean.step == 2
        assert len(s["grid"]) == 2
        for depth, row in s["grid"].items():  # depth keys "0.0", tags "depth_0"
            for length in ("256", "512"):
                (cell,) = events.Scalars(f"eval/niah/{task}/len_{length}/depth_{float(depth):g}")
                assert cell.value == pytest.approx(row[length])
    assert len(a["records"]) == len(retrieval.TASKS) * 2 * 2
    assert set(first["summary"]) == set(retrieval.TASKS)
    for task in retrieval.TASKS:
        if first["png"][task]:
            assert (tmp_path / "a" / f"heatmap_{task}.png").stat().st_size > 0
        assert "depth" in (tmp_path / "a" / f"heatmap_{task}.txt").read_text()
    assert a["meta"]["seq_len"] == 512 and a["meta"]["seed"] == 0  # length 512 = seq_len fits
    # a second run of two tasks: the same prompts and the same greedy answers
    main(args + ["--tasks", "s-niah-2,mqar", "--out", str(tmp_path / "b")])
    b = json.loads((tmp_path / "b" / "results.json").read_text())
    assert b["records"] == [r for r in a["records"] if r["task"] in ("s-niah-2", "mqar")]
    # the records are those of the prompts build_samples gives
    model, data = load_checkpoint(checkpoint)
    tok = checkpoint_tokenizer(model.cfg, data)
    samples = retrieval.build_samples(tok, retrieval.TASKS, [256, 512], [0, 100], 1, 0)
    assert [(len(s.prompt), s.answer) for s in samples] == \
        [(r["prompt_tokens"], r["answer"]) for r in a["records"]]
    with pytest.raises(ValueError, match=r"length\(s\) 600 do not fit .*seq_len \(512\)"):
        main(["niah", "--ckpt_path", str(checkpoint), "--lengths", "600", "--samples", "1",
              "--tasks", "s-niah-1", "--no_progress", "--out", str(tmp_path / "c")])
