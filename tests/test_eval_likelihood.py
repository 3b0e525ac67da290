"""The batched, length-sorted log-likelihood helper equals a one-sequence-at-a-time computation."""
import pytest
import torch

from nsa_lit.eval.likelihood import loglikelihood
from nsa_lit.generate import generate
from nsa_lit.model import Transformer
from test_model import config


@torch.no_grad()
def one_at_a_time(model, context, continuation):
    """The reference: one unpadded forward of context + continuation (left-cut to seq_len)."""
    full = (list(context) + list(continuation))[-(model.cfg.seq_len + 1):]
    logits = model(torch.tensor([full[:-1]]))[0].double().log_softmax(-1)
    n = len(continuation)
    lp = logits[-n:]
    target = torch.tensor(full[-n:])
    return float(lp.gather(-1, target[:, None]).sum()), bool((lp.argmax(-1) == target).all())


@pytest.mark.parametrize("name", ["asa", "nsa", "full"])
def test_batched_equals_one_at_a_time(name):
    torch.manual_seed(0)
    model = Transformer(config(name)).double().eval()
    g = torch.Generator().manual_seed(1)
    requests = []
    for ctx_len, cont_len in [(5, 1), (40, 3), (1, 7), (63, 1), (20, 20), (30, 2), (9, 4)]:
        requests.append((torch.randint(0, 97, (ctx_len,), generator=g).tolist(),
                         torch.randint(0, 97, (cont_len,), generator=g).tolist()))
    results = loglikelihood(model, requests, batch_size=3)
    for (context, continuation), result in zip(requests, results):
        expected, greedy = one_at_a_time(model, context, continuation)
        assert result.logprob == pytest.approx(expected, abs=1e-9)
        assert result.is_greedy == greedy and result.n_tokens == len(continuation)
        assert result.truncated == 0
    # batch size does not matter (padding to the right never reaches earlier positions)
    singles = loglikelihood(model, requests, batch_size=1)
    assert [r.logprob for r in singles] == pytest.approx([r.logprob for r in results], abs=1e-9)


@pytest.mark.parametrize("name", ["asa", "nsa", "full"])
def test_is_greedy_and_left_truncation(name):
    torch.manual_seed(0)
    model = Transformer(config(name)).double().eval()
    context = torch.randint(0, 97, (10,), generator=torch.Generator().manual_seed(2)).tolist()
    greedy = generate(model, [context], 5)[0]
    wrong = greedy[:2] + [(greedy[2] + 1) % 97] + greedy[3:]
    long_context = list(range(90)) + context  # 100 + 5 tokens > seq_len 64: cut from the left
    res = loglikelihood(model, [(context, greedy), (context, wrong), (long_context, greedy)])
    assert res[0].is_greedy and not res[1].is_greedy
    assert res[0].logprob > res[1].logprob
    assert res[2].truncated == len(long_context) + 5 - 65
    expected, _ = one_at_a_time(model, long_context, greedy)
    assert res[2].logprob == pytest.approx(expected, abs=1e-9)


def test_refuses_what_it_cannot_score():
    model = Transformer(config("full")).eval()
    with pytest.raises(ValueError, match="request 0: empty context"):
        loglikelihood(model, [([], [1])])
    with pytest.raises(ValueError, match="request 1: empty continuation"):
        loglikelihood(model, [([1], [2]), ([1], [])])
    with pytest.raises(ValueError, match="longer than the model's seq_len"):
        loglikelihood(model, [([1], [2] * 65)])
    with pytest.raises(ValueError, match="outside"):
        loglikelihood(model, [([1], [200])])


def test_text_requests_are_encoded_as_lm_eval_encodes_them(monkeypatch):
    """``loglikelihood_text``: the context's trailing whitespace joins the continuation, the whole
    text is encoded and the context's tokens split off (SentencePiece: no lone word-boundary
    token before the continuation); an empty context is EOS."""
    from nsa_lit.data import load_tokenizer
    from nsa_lit.eval import likelihood

    tok = load_tokenizer("mistral-v1")
    seen = []
    monkeypatch.setattr(likelihood, "loglikelihood", lambda model, pairs, **kw: seen.extend(pairs))
    likelihood.loglikelihood_text(None, tok, [("The capital of France is", " Paris"),
                                              ("Question: 2 + 2 =\n", "4"), ("", "Hello")])
    ctx = tok.encode("The capital of France is")
    assert seen[0] == (ctx, tok.encode("The capital of France is Paris")[len(ctx):])
    assert len(seen[0][1]) == 1  # " Paris" is one token in the running text
    ctx = tok.encode("Question: 2 + 2 =")
    assert seen[1] == (ctx, tok.encode("Question: 2 + 2 =\n4")[len(ctx):])
    assert seen[2] == ([tok.eos_id], tok.encode("Hello"))
