"""LongBench from local files (nsa_lit/eval/longbench.py, longbench_metrics.py and
``python -m nsa_lit.eval longbench``): each metric against values worked out by hand, LongBench's
middle truncation, the prompt templates, and a run on synthetic task files with a tiny random
model."""
import json
import random
from dataclasses import asdict

import pytest
import torch

from nsa_lit.data.tokenizer import load_tokenizer, train_bpe
from nsa_lit.eval import longbench
from nsa_lit.eval import longbench_metrics as m
from nsa_lit.eval.__main__ import main
from nsa_lit.generate import generate
from nsa_lit.model import Transformer
from test_model import config

EPS = 1e-8  # the rouge package's term in F = 2PR / (P + R + EPS)


# -- metrics ---------------------------------------------------------------------------------
def test_normalize_answer_edge_cases():
    assert m.normalize_answer("The  Cat's, an   apple!") == "cats apple"
    assert m.normalize_answer("Theater and THE anthem") == "theater and anthem"  # whole words only
    # punctuation goes first: "a-the" becomes one word that is no article
    assert m.normalize_answer("a-the") == "athe"
    assert m.normalize_answer(" \n\t ") == "" and m.normalize_answer("A. An! The?") == ""


def test_qa_f1():
    # [cat, sat] vs [cat, sat, down]: P = 1, R = 2/3, F1 = 0.8
    assert m.qa_f1("the cat sat", "a cat sat down") == pytest.approx(0.8)
    # counted as multisets: one shared "cat"; P = 1/2, R = 1
    assert m.qa_f1("cat cat", "The cat.") == pytest.approx(2 / 3)
    assert m.qa_f1("Paris!", "paris") == 1.0
    assert m.qa_f1("", "paris") == 0.0 and m.qa_f1("the", "a") == 0.0  # nothing left to share


def test_rouge_l_summary_level():
    # one sentence each; LCS "the cat on the mat", distinct words {the, cat, on, mat}: P = R = 4/5
    assert m.rouge_l("the cat sat on the mat", "the cat lay on the mat") == \
        pytest.approx(2 * 0.8 * 0.8 / (1.6 + EPS), abs=1e-15)
    # sentences split at dots: the union of per-sentence LCS words covers all 4 words, where the
    # flat sequences "a b c d" / "a c b d" share only 3 in order
    assert m.rouge_l("a b. c d", "a c. b d") == pytest.approx(2 / (2 + EPS), abs=1e-15)
    # distinct words: a repeated word counts once in P, R and the union
    assert m.rouge_l("x x x", "x") == pytest.approx(2 / (2 + EPS), abs=1e-15)
    # "b" only in the prediction: P = 2/3, R = 1
    assert m.rouge_l("a b c", "a c") == pytest.approx(2 * (2 / 3) / (5 / 3 + EPS), abs=1e-15)
    # no sentence at all (empty, or dots only): 0, as LongBench scores the rouge error
    for pred, ref in (("", "a"), ("...", "a b"), ("a", ""), ("a", ". .")):
        assert m.rouge_l(pred, ref) == 0.0
    assert m.rouge_l("x y", "z") == 0.0


def test_lcs_reconstruction_breaks_ties_like_rouge():
    # LCS of [a, b] and [b, a] has length 1; walking back, the prediction steps back on a tie
    assert m.lcs_words(["a", "b"], ["b", "a"]) == ["b"]
    assert m.lcs_words(["a", "b", "c", "d"], ["a", "c", "d", "b"]) == ["a", "c", "d"]
    assert m.lcs_words([], ["a"]) == []


def test_classification():
    classes = ["Entity", "Location", "Description", "Description of something"]
    assert m.classification("Entity", "Entity", all_classes=classes) == 1.0
    assert m.classification("Location or Entity", "Location", all_classes=classes) == 0.5
    assert m.classification("a person", "Entity", all_classes=classes) == 0.0
    # a class inside the answer ("Description" in "Description of something") is dropped
    assert m.classification("Description of something", "Description of something",
                            all_classes=classes) == 1.0
    # LongBench drops while iterating: after "ab" is dropped, "abc" is not checked
    assert m.classification("abcd", "abcd", all_classes=["ab", "abc", "abcd"]) == 0.5


def test_retrieval_and_count():
    assert m.retrieval("Paragraph 3", "Paragraph 3") == 1.0
    assert m.retrieval("Paragraph 3 or Paragraph 12", "Paragraph 3") == 0.5
    assert m.retrieval("Paragraph 13", "Paragraph 3") == 0.0  # whole numbers, not substrings
    assert m.retrieval("I do not know", "Paragraph 3") == 0.0
    with pytest.raises(ValueError, match="names no 'Paragraph N'"):
        m.retrieval("3", "the third")
    assert m.count("There are 12 unique paragraphs, not 3.", "12") == 0.5
    assert m.count("12", "12") == 1.0 and m.count("", "4") == 0.0 and m.count("14", "4") == 0.0


def test_code_similarity():
    assert m.fuzz_ratio("same", "same") == 100 and m.fuzz_ratio("", "") == 100
    assert m.fuzz_ratio("", "a") == 0
    assert m.fuzz_ratio("abcd", "abce") == 75  # 2 * 3 matching / 8 characters
    # 2 * 1 / 16 = 12.5%: Python's round, half to even, as fuzzywuzzy
    assert m.fuzz_ratio("a", "abcdefghijklmno") == 12
    # the first line without ` # // (leading newlines dropped) is compared
    assert m.code_similarity("\n# add one\n    return x + 1\nprint(x)", "    return x + 1") == 1.0
    assert m.code_similarity("x = 1", "x = 2") == 0.8  # 2 * 4 / 10
    assert m.code_similarity("```python\n// c", "x = 1") == 0.0  # no plain line: ""


def test_score_answers_takes_the_best_answer_and_the_first_line():
    assert m.score_answers("qa_f1", "cat", ["dog", "the cat", "cat sat"]) == 1.0
    assert m.score_answers("qa_f1", "cat", []) == 0.0
    prediction = "\n\nParis\nQuestion: what is the capital of Italy?\nAnswer: Rome"
    assert m.score_answers("qa_f1", prediction, ["Paris"], only_first_line=True) == 1.0
    assert m.score_answers("qa_f1", prediction, ["Paris"]) < 0.5
    with pytest.raises(ValueError, match="unknown LongBench metric 'bleu'"):
        m.score_answers("bleu", "a", ["a"])


# -- prompts and truncation ------------------------------------------------------------------
def test_tasks_cover_longbench_english_with_their_metrics():
    metric_of = {"qa_f1": {"narrativeqa", "qasper", "multifieldqa_en", "hotpotqa", "2wikimqa",
                           "musique", "triviaqa"},
                 "rouge_l": {"gov_report", "qmsum", "multi_news", "samsum"},
                 "classification": {"trec"}, "retrieval": {"passage_retrieval_en"},
                 "count": {"passage_count"}, "code_similarity": {"lcc", "repobench-p"}}
    assert {t: s.metric for t, s in longbench.TASKS.items()} == \
        {t: metric for metric, tasks in metric_of.items() for t in tasks}
    assert {t for t, s in longbench.TASKS.items() if s.first_line} == {"trec", "triviaqa", "samsum"}
    for task, spec in longbench.TASKS.items():
        assert "{context}" in spec.prompt
        filled = spec.prompt.format(context="CTX", input="INP")
        assert "CTX" in filled and ("INP" in filled) == ("{input}" in spec.prompt), task
    ex = longbench.Example("repobench-p", 0, "x", "import os\n", "def f():\n", ["    pass"],
                           None, 3)
    assert ex.prompt() == \
        "Please complete the code given below. \nimport os\ndef f():\nNext line of code:\n"


def test_truncate_middle_keeps_the_first_and_last_halves():
    ids = list(range(1000))
    kept, dropped = longbench.truncate_middle(ids, 101)
    assert kept == ids[:50] + ids[-51:] and dropped == 899
    kept, dropped = longbench.truncate_middle(ids, 100)
    assert kept == ids[:50] + ids[-50:] and dropped == 900
    assert longbench.truncate_middle(ids, 1000) == (ids, 0)
    assert longbench.truncate_middle(ids[:5], 1) == ([4], 4)
    with pytest.raises(ValueError, match="budget"):
        longbench.truncate_middle(ids, 0)
    with pytest.raises(ValueError, match="--max_length 40 leaves no room .* gov_report"):
        longbench.prompt_budget("gov_report", 40)
    assert longbench.prompt_budget("hotpotqa", 256) == 224


def test_truncation_of_a_long_prompt_is_token_level(tokenizer):
    rng = random.Random(0)
    context = " ".join(rng.choice(WORDS) for _ in range(3000))
    ex = longbench.Example("hotpotqa", 0, "x", context, "Who runs?", ["fox"], None, 3000)
    full = tokenizer.encode(ex.prompt())
    budget = longbench.prompt_budget("hotpotqa", 256)
    assert len(full) > 4 * budget
    kept, dropped = longbench.truncate_middle(full, budget)
    assert len(kept) == budget and dropped == len(full) - budget
    assert kept[: budget // 2] == full[: budget // 2]
    assert kept[budget // 2:] == full[len(full) - (budget - budget // 2):]
    # the instructions at both ends survive the cut
    assert tokenizer.decode(kept).startswith("Answer the question based on the given passages.")
    assert tokenizer.decode(kept).endswith("Question: Who runs?\nAnswer:")


# -- end to end ------------------------------------------------------------------------------
CLASSES = ["Entity", "Location", "Description"]
WORDS = "the quick brown fox jumps over lazy dog river stone light runs falls".split()
SEQ_LEN = 256


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tok")
    texts = [" ".join(WORDS)] * 20 + [longbench.TASKS["hotpotqa"].prompt,
                                      longbench.TASKS["trec"].prompt] * 5
    train_bpe("bpe:300", iter(texts), tmp)
    return tmp


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return load_tokenizer("bpe:300", tokenizer_dir)


@pytest.fixture(scope="module")
def checkpoint(tokenizer_dir, tmp_path_factory):
    """A training checkpoint's layout with a tiny random model (no training needed here)."""
    torch.manual_seed(0)
    cfg = config("asa", vocab_size=320, seq_len=SEQ_LEN)
    model = Transformer(cfg)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "hyper_parameters": {"arch": asdict(cfg)}, "global_step": 7,
                "datamodule_hyper_parameters": {"tokenizer": "bpe:300",
                                                "data_dir": str(tokenizer_dir)}}, path)
    return path


def write_task_files(root):
    rng = random.Random(1)
    root.mkdir(parents=True, exist_ok=True)
    qa = []
    for i, n_words in enumerate((4, 8, 3000)):  # the last one is cut in the middle
        qa.append({"input": f"Which animal number {i}?",
                   "context": " ".join(rng.choice(WORDS) for _ in range(n_words)),
                   "answers": ["fox", "the brown fox"], "length": n_words, "all_classes": None,
                   "dataset": "hotpotqa", "language": "en", "_id": f"qa{i}"})
    classes = CLASSES
    trec = [{"input": "Where is the river?", "context": "What is a fox?\nType: Description\n" * k,
             "answers": [classes[k % 3]], "length": 9 * k, "all_classes": classes,
             "dataset": "trec", "language": "en", "_id": f"t{k}"} for k in (1, 2)]
    for name, rows in (("hotpotqa", qa), ("trec", trec)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def test_longbench_command_end_to_end(checkpoint, tokenizer, tmp_path):
    data = write_task_files(tmp_path / "data")
    args = ["longbench", "--ckpt_path", str(checkpoint), "--data_dir", str(data), "--tasks",
            "hotpotqa,trec", "--no_progress", "--device", "cpu"]
    first = main(args + ["--output_path", str(tmp_path / "a.json"),
                         "--tb_dir", str(tmp_path / "tb")])
    saved = json.loads((tmp_path / "a.json").read_text())
    assert saved["summary"] == first["summary"] and set(saved["summary"]) == {"hotpotqa", "trec"}
    records = saved["records"]
    assert [(r["task"], r["id"]) for r in records] == [
        ("hotpotqa", "qa0"), ("hotpotqa", "qa1"), ("hotpotqa", "qa2"), ("trec", "t1"), ("trec", "t2")]
    assert [r["truncated"] > 0 for r in records] == [False, False, True, False, False]
    assert saved["summary"]["hotpotqa"]["truncated"] == 1
    for task, s in saved["summary"].items():
        rows = [r for r in records if r["task"] == task]
        assert 0 <= s["score"] <= 100 and s["accuracy"] == pytest.approx(s["score"] / 100)
        assert s["score"] == round(100 * sum(r["score"] for r in rows) / len(rows), 2)
        for r in rows:  # each record's score is its metric on its prediction
            assert 0 <= r["score"] <= 1
            spec = longbench.TASKS[task]
            assert r["score"] == m.score_answers(spec.metric, r["prediction"], r["answers"],
                                                 CLASSES, spec.first_line)
    assert saved["average"] == round((saved["summary"]["hotpotqa"]["score"]
                                      + saved["summary"]["trec"]["score"]) / 2, 2)
    assert saved["meta"]["max_length"] == SEQ_LEN and saved["meta"]["seq_len"] == SEQ_LEN
    # the answers are greedy generations from the middle-truncated prompt
    model = Transformer(config("asa", vocab_size=320, seq_len=SEQ_LEN))
    ckpt = torch.load(checkpoint, weights_only=False)
    model.load_state_dict({k.removeprefix("model."): v for k, v in ckpt["state_dict"].items()})
    model.eval()
    long_one = [json.loads(line) for line in (data / "hotpotqa.jsonl").read_text().splitlines()][2]
    prompt = longbench.TASKS["hotpotqa"].prompt.format(**long_one)
    ids, _ = longbench.truncate_middle(tokenizer.encode(prompt), SEQ_LEN - 32)
    (out,) = generate(model, [ids], 32, eos_id=tokenizer.eos_id)
    assert records[2]["prediction"] == tokenizer.decode([t for t in out if t != tokenizer.eos_id])
    assert records[2]["prompt_tokens"] == len(tokenizer.encode(prompt))
    # TensorBoard: one scalar per task and the average, at the checkpoint's step
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert set(events.Tags()["scalars"]) == {"eval/longbench/hotpotqa", "eval/longbench/trec",
                                             "eval/longbench/average"}
    (point,) = events.Scalars("eval/longbench/trec")
    assert point.step == 7 and point.value == pytest.approx(saved["summary"]["trec"]["score"])
    # deterministic: a second run gives the same records; --limit and --max_length apply
    main(args + ["--output_path", str(tmp_path / "b.json")])
    assert json.loads((tmp_path / "b.json").read_text())["records"] == records
    main(args + ["--output_path", str(tmp_path / "c.json"), "--limit", "1", "--max_length", "128"])
    c = json.loads((tmp_path / "c.json").read_text())
    assert [r["id"] for r in c["records"]] == ["qa0", "t1"] and c["meta"]["max_length"] == 128
    with pytest.raises(ValueError, match=r"--max_length 300 exceeds the model's seq_len \(256\)"):
        main(args + ["--max_length", "300", "--output_path", str(tmp_path / "d.json")])


def test_missing_data_names_the_files_and_the_source(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "trec.jsonl").write_text("")
    # the data is checked before the checkpoint is read (here it does not even exist)
    with pytest.raises(FileNotFoundError) as err:
        main(["longbench", "--ckpt_path", str(tmp_path / "none.ckpt"), "--data_dir",
              str(tmp_path / "data"), "--tasks", "hotpotqa,trec,lcc"])
    text = str(err.value)
    assert str(tmp_path / "data" / "hotpotqa.jsonl") in text
    assert str(tmp_path / "data" / "lcc.jsonl") in text and "trec.jsonl" not in text
    assert "THUDM/LongBench" in text and longbench.DATA_URL in text and "--data_dir" in text


def test_bad_task_files_and_task_names(tmp_path):
    with pytest.raises(ValueError, match="unknown LongBench task\\(s\\) nope, dureader"):
        longbench.parse_tasks("hotpotqa,nope,dureader")
    path = tmp_path / "hotpotqa.jsonl"
    path.write_text('{"input": "q", "context": "c", "answers": ["a"]}\n{"input": "q"}\n')
    with pytest.raises(ValueError, match=f"{path}:2: no field 'context'"):
        longbench.read_task(tmp_path, "hotpotqa")
    assert len(longbench.read_task(tmp_path, "hotpotqa", limit=1)) == 1
    path.write_text("not json\n")
    with pytest.raises(ValueError, match=f"{path}:1: not JSON"):
        longbench.read_task(tmp_path, "hotpotqa")
    (tmp_path / "trec.jsonl").write_text('{"input": "q", "context": "c", "answers": ["a"]}\n')
    with pytest.raises(ValueError, match="trec needs 'all_classes'"):
        longbench.read_task(tmp_path, "trec")
