"""Long-context retrieval generated locally (no downloads): needle-in-a-haystack and MQAR.

Tasks (templates after RULER's NIAH and Zoology's multi-query associative recall):

- ``s-niah-1``: a 7-digit pass key in repeated noise ("The grass is green. The sky is blue. ...").
- ``s-niah-2``: a 7-digit magic number for a key word, in an essay haystack.
- ``s-niah-3``: a UUID for a key word, in an essay haystack.
- ``mk-niah``: four needles (magic numbers for four different key words) in an essay haystack;
  the question asks for one of them, the others are distractors.
- ``mqar``: the context is all key-value pairs (``key: number.``, unique keys); then a few
  queries answered in the prompt and a last query whose answer is scored.

The essay haystack is prose from the embedded corpus (:func:`nsa_lit.data.corpus.python_docs_documents`,
the Python documentation), split into sentences. A prompt is built from separately encoded
pieces (instructions, haystack sentences, needle, question), so every token position is known:
the haystack fills the requested length to within one sentence (``length`` counts the prompt
and the answer's tokens, as RULER counts the generated tokens in its length: a prompt of length
``seq_len`` fits the model),
and the needle (the queried pair, for MQAR) starts at the sentence boundary nearest to
``depth`` percent of the haystack. Every random choice (needle values, key words, where in the
corpus the haystack starts, distractor places) comes from ``random.Random`` seeded with
``(seed, task, length, depth, sample)``, so every model gets the same prompts (token positions
are the same for models that share a tokenizer).

Scoring: greedy generation (:func:`nsa_lit.generate.generate`, decode caches) of as many tokens
as the answer has; a sample is correct when the decoded output, stripped, equals the answer.
"""
from __future__ import annotations

import json
import random
import re
import uuid
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Sequence

TASKS = ("s-niah-1", "s-niah-2", "s-niah-3", "mk-niah", "mqar")
NOISE = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.",
         "There and back again.")
KEY_WORDS = ("apple", "river", "candle", "falcon", "garden", "harbor", "island", "jacket",
             "kettle", "lantern", "meadow", "needle", "orchard", "pepper", "quartz", "rocket",
             "saddle", "tunnel", "violin", "walnut", "yellow", "zebra", "anchor", "bishop",
             "copper", "dragon", "ember", "forest", "glacier", "hammer", "ivory", "jungle")
MK_NEEDLES = 4       # needles in a multi-key NIAH prompt (one queried, three distractors)
MQAR_SHOWN = 3       # queries answered in an MQAR prompt before the scored one


@dataclass
class Sample:
    """One prompt and its answer, with where the needle went."""

    task: str
    length: int               # requested length (tokens): prompt + answer <= length
    depth: float              # requested needle depth (percent of the haystack)
    index: int                # sample number within the (task, length, depth) cell
    prompt: list[int]
    answer: str
    needle_pos: int           # token index in ``prompt`` where the needle starts
    haystack_start: int       # token index where the haystack starts
    haystack_tokens: int      # haystack tokens, needle(s) included
    max_piece: int            # longest haystack sentence (MQAR: key-value pair), in tokens
    needle_depth: float       # where it went: haystack-sentence tokens before it, % of them all
    extra: dict[str, Any] = field(default_factory=dict)


# -- haystacks -----------------------------------------------------------------------------------
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_PROSE = re.compile(r"^[A-Z][A-Za-z0-9 ,;:'()\-]+[.]$")


@lru_cache(maxsize=1)
def essay_sentences(max_bytes: int = 1_500_000) -> tuple[str, ...]:
    """Prose sentences of the embedded corpus, in corpus order: paragraphs of plain text split
    at sentence ends, kept when 30-250 characters of letters, digits and light punctuation
    (code, tables and markup dropped)."""
    from nsa_lit.data.corpus import python_docs_documents

    out = []
    for _, text in python_docs_documents(max_bytes=max_bytes):
        for paragraph in re.split(r"\n\s*\n", text):
            if paragraph.startswith((" ", "\t", ">>>")):
                continue
            for sentence in _SENTENCE_END.split(" ".join(paragraph.split())):
                if 30 <= len(sentence) <= 250 and _PROSE.match(sentence):
                    out.append(sentence)
    if len(out) < 100:
        raise RuntimeError(f"the embedded corpus gave only {len(out)} prose sentences")
    return tuple(out)


def space_prefix(tokenizer) -> str:
    """What to put before a piece that follows a word: ``""`` for a tokenizer that starts every
    encoding with a word boundary (SentencePiece), ``" "`` for one that does not (byte BPE)."""
    return "" if tokenizer.decode(tokenizer.encode("a") + tokenizer.encode("b")) == "a b" else " "


class _Pieces:
    """Encodes text pieces once per tokenizer; a piece written ``" text"`` follows a word (one
    space between them whatever the tokenizer, :func:`space_prefix`)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.space = space_prefix(tokenizer)
        self.cache: dict[str, list[int]] = {}

    def __call__(self, text: str) -> list[int]:
        if text not in self.cache:
            body = self.space + text[1:] if text.startswith(" ") else text
            self.cache[text] = self.tokenizer.encode(body)
        return self.cache[text]


def _filler(task: str, rng: random.Random) -> Callable[[int], str]:
    """Sentence ``i`` of the haystack."""
    if task == "s-niah-1":
        return lambda i: NOISE[i % len(NOISE)]
    sentences = essay_sentences()
    start = rng.randrange(len(sentences))
    return lambda i: sentences[(start + i) % len(sentences)]


def _number(rng: random.Random) -> str:
    return str(rng.randrange(1_000_000, 10_000_000))


def _mqar_key(rng: random.Random) -> str:
    return f"{rng.choice(KEY_WORDS)}-{rng.randrange(100, 1000)}"


def _build(task: str, length: int, depth: float, index: int, seed: int, encode: _Pieces) -> Sample:
    # the seed string is written canonically, so depth 50 and 50.0 give the same prompt
    rng = random.Random(f"{int(seed)}:{task}:{int(length)}:{float(depth):g}:{int(index)}")
    extra: dict[str, Any] = {}
    if task == "mqar":
        return _build_mqar(length, depth, index, rng, encode)
    if task == "s-niah-1":
        answer = _number(rng)
        intro = ("There is a pass key hidden inside a lot of irrelevant text. Find it and memorize "
                 "it. I will quiz you about the pass key.")
        needles = [f"The pass key is {answer}. Remember it. {answer} is the pass key."]
        question = "What is the pass key? The pass key is"
    else:
        keys = rng.sample(KEY_WORDS, MK_NEEDLES if task == "mk-niah" else 1)
        kind = "UUID" if task == "s-niah-3" else "number"
        values = [str(uuid.UUID(int=rng.getrandbits(128), version=4)) if kind == "UUID"
                  else _number(rng) for _ in keys]
        answer = values[0]
        intro = (f"A special magic {kind} is hidden within the following text. Make sure to "
                 f"memorize it. I will quiz you about the {kind} afterwards.")
        if task == "mk-niah":
            intro = intro.replace(f"A special magic {kind} is", f"Some special magic {kind}s are")
        needles = [f"One of the special magic {kind}s for {k} is: {v}." for k, v in zip(keys, values)]
        question = (f"What is the special magic {kind} for {keys[0]} mentioned in the provided "
                    f"text? The special magic {kind} for {keys[0]} mentioned in the provided text is")
        extra["key"] = keys[0]
        if len(keys) > 1:
            extra["distractors"] = dict(zip(keys[1:], values[1:]))
    head = encode(intro)
    tail = encode(" " + question)
    needle_ids = [encode(" " + n) for n in needles]
    budget = length - len(head) - len(tail) - sum(map(len, needle_ids)) - len(encode(" " + answer))
    sentence = _filler(task, rng)
    hay: list[list[int]] = []
    used = misses = i = 0
    while misses < 50:  # a sentence that does not fit is skipped; 50 in a row end the haystack
        piece = encode(" " + sentence(i))
        i += 1
        if used + len(piece) > budget:
            misses += 1
            continue
        misses = 0
        hay.append(piece)
        used += len(piece)
        if i > 10 * length:
            raise RuntimeError("haystack does not grow: the tokenizer encodes sentences to nothing")
    if budget < 0:
        raise ValueError(f"{task}: length {length} is too short for the instructions, needle, "
                         f"question and answer ({length - budget} tokens)")
    # the queried needle goes to the sentence boundary nearest to depth% of the haystack
    bounds = [0]
    for piece in hay:
        bounds.append(bounds[-1] + len(piece))
    target = depth / 100.0 * used
    at = min(range(len(bounds)), key=lambda j: (abs(bounds[j] - target), j))
    slots = {at: [needle_ids[0]]}
    for other in needle_ids[1:]:  # distractors at random boundaries
        slots.setdefault(rng.randrange(len(bounds)), []).append(other)
    prompt = list(head)
    needle_pos = -1
    for j in range(len(bounds)):
        for n, ids in enumerate(slots.get(j, [])):
            if ids is needle_ids[0]:
                needle_pos = len(prompt)
            prompt += ids
        if j < len(hay):
            prompt += hay[j]
    prompt += tail
    return Sample(task, length, depth, index, prompt, answer, needle_pos, len(head),
                  len(prompt) - len(head) - len(tail), max(map(len, hay), default=0),
                  100.0 * bounds[at] / max(1, used), extra)


def _build_mqar(length: int, depth: float, index: int, rng: random.Random, encode: _Pieces) -> Sample:
    head = encode("Memorize the value of each key. Then answer the queries.")
    recall = encode(" Queries:")
    keys: list[str] = []
    pairs: list[list[int]] = []
    seen: set[str] = set()
    values: dict[str, str] = {}
    query_cost = answer_cost = 0
    used = 0
    while True:
        key = _mqar_key(rng)
        if key in seen:
            if len(seen) > 800 * len(KEY_WORDS):  # key space nearly spent
                break
            continue
        value = _number(rng)
        piece = encode(f" {key}: {value}.")
        # room for this pair, the queries (each about as long as a pair) and the answer
        query_cost = max(query_cost, len(piece))
        answer_cost = max(answer_cost, len(encode(" " + value)))
        if (used + len(piece) + len(head) + len(recall) + (MQAR_SHOWN + 1) * query_cost
                + answer_cost > length):
            break
        seen.add(key)
        keys.append(key)
        values[key] = value
        pairs.append(piece)
        used += len(piece)
    if len(keys) < MQAR_SHOWN + 1:
        raise ValueError(f"mqar: length {length} holds fewer than {MQAR_SHOWN + 1} key-value pairs")
    bounds = [0]
    for piece in pairs:
        bounds.append(bounds[-1] + len(piece))
    target = depth / 100.0 * used
    queried = min(range(len(pairs)), key=lambda j: (abs(bounds[j] - target), j))
    shown = rng.sample([j for j in range(len(pairs)) if j != queried], MQAR_SHOWN)
    prompt = list(head) + [t for piece in pairs for t in piece] + list(recall)
    for j in shown:
        prompt += encode(f" {keys[j]}: {values[keys[j]]}.")
    prompt += encode(f" {keys[queried]}:")
    return Sample("mqar", length, depth, index, prompt, values[keys[queried]],
                  len(head) + bounds[queried], len(head), used, max(map(len, pairs)),
                  100.0 * bounds[queried] / used, {"key": keys[queried], "pairs": len(pairs)})


def build_samples(tokenizer, tasks: Sequence[str], lengths: Sequence[int], depths: Sequence[float],
                  samples: int, seed: int) -> list[Sample]:
    """Every (task, length, depth, sample) prompt, in that order; deterministic from ``seed``."""
    for task in tasks:
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}: choose from {', '.join(TASKS)}")
    for depth in depths:
        if not 0 <= depth <= 100:
            raise ValueError(f"depth {depth} is not a percentage in [0, 100]")
    encode = _Pieces(tokenizer)
    return [_build(task, length, depth, i, seed, encode)
            for task in tasks for length in lengths for depth in depths for i in range(samples)]


# -- scoring -------------------------------------------------------------------------------------
def answer_tokens(tokenizer, sample: Sample) -> int:
    """Tokens generated for a sample: those of the answer as it follows the prompt's last word."""
    return len(tokenizer.encode(space_prefix(tokenizer) + sample.answer))


def exact_match(prediction: str, answer: str) -> bool:
    return prediction.strip() == answer.strip()


def evaluate(model, tokenizer, samples: Sequence[Sample], batch_size: int = 8,
             progress: bool = False, generate_fn: Callable | None = None) -> list[dict[str, Any]]:
    """Greedy answers and exact-match scores, one record per sample (in the order of
    ``samples``). Samples of one task whose answers have the same number of tokens are decoded together in
    batches of ``batch_size``, each generating exactly its answers' tokens; ``generate_fn`` (default
    :func:`nsa_lit.generate.generate`) is a test hook."""
    if generate_fn is None:
        from nsa_lit.generate import generate as generate_fn
    groups: dict[tuple[str, int], list[Sample]] = {}
    for s in samples:  # a batch generates exactly its answers' tokens: prompt + answer <= length
        groups.setdefault((s.task, answer_tokens(tokenizer, s)), []).append(s)
    batches = [g[i: i + batch_size] for g in groups.values() for i in range(0, len(g), batch_size)]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(samples), desc="niah", unit="prompt")
    records = []
    for batch in batches:
        budget = answer_tokens(tokenizer, batch[0])
        outputs = generate_fn(model, [s.prompt for s in batch], budget)
        for s, out in zip(batch, outputs):  # (records are re-ordered below)
            out = list(out)[:budget]
            prediction = tokenizer.decode([t for t in out if t != tokenizer.eos_id])
            record = {k: v for k, v in asdict(s).items() if k != "prompt"}
            record.update(prompt_tokens=len(s.prompt), needle_depth=round(s.needle_depth, 2),
                          prediction=prediction, correct=exact_match(prediction, s.answer))
            records.append((id(s), record))
        if bar is not None:
            bar.update(len(batch))
    if bar is not None:
        bar.close()
    by_sample = dict(records)
    return [by_sample[id(s)] for s in samples]


def summarize(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per task: accuracy overall, by length, and the depth x length grid
    (``grid[depth][length]``, keys as strings)."""
    out: dict[str, Any] = {}
    for task in dict.fromkeys(r["task"] for r in records):
        rows = [r for r in records if r["task"] == task]
        lengths = sorted({r["length"] for r in rows})
        depths = sorted({r["depth"] for r in rows})

        def acc(rs):
            return sum(r["correct"] for r in rs) / len(rs) if rs else None

        out[task] = {
            "accuracy": acc(rows), "samples": len(rows),
            "lengths": lengths, "depths": depths,
            "by_length": {str(n): acc([r for r in rows if r["length"] == n]) for n in lengths},
            "grid": {str(d): {str(n): acc([r for r in rows if r["depth"] == d and r["length"] == n])
                              for n in lengths} for d in depths},
        }
    return out


def text_table(task: str, summary: dict[str, Any]) -> str:
    """The depth x length grid of one task as a plain-text table (accuracy in percent)."""
    lengths, depths = summary["lengths"], summary["depths"]
    lines = [f"{task}: exact-match accuracy (%), rows: needle depth (%), columns: length (tokens)",
             "depth " + "".join(f"{n:>8}" for n in lengths)]
    for d in depths:
        cells = "".join(f"{100 * summary['grid'][str(d)][str(n)]:8.0f}" for n in lengths)
        lines.append(f"{d:>5g} " + cells)
    lines.append(f"all   {100 * summary['accuracy']:8.1f}")
    return "\n".join(lines)


def heatmap_png(task: str, summary: dict[str, Any], path: Path, title: str) -> bool:
    """Write the depth x length heatmap; False (nothing written) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    lengths, depths = summary["lengths"], summary["depths"]
    grid = [[summary["grid"][str(d)][str(n)] for n in lengths] for d in depths]
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(lengths), 1.2 + 0.5 * len(depths)))
    im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth (%)")
    ax.set_title(f"{title}: {task}", fontsize=9)
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            ax.text(j, i, f"{100 * v:.0f}", ha="center", va="center", fontsize=7)
    fig.colorbar(im, ax=ax, label="accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_outputs(out_dir: Path, meta: dict[str, Any], records: Sequence[dict[str, Any]]) -> dict:
    """``results.json`` (meta, summary, per-sample records), ``heatmap_<task>.txt`` and, with
    matplotlib, ``heatmap_<task>.png`` under ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = summarize(records)
    pngs = {}
    for task, s in summary.items():
        (out_dir / f"heatmap_{task}.txt").write_text(text_table(task, s) + "\n")
        pngs[task] = heatmap_png(task, s, out_dir / f"heatmap_{task}.png", meta.get("model", ""))
    result = {"meta": meta, "summary": summary, "records": list(records)}
    (out_dir / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    return {"summary": summary, "png": pngs}
