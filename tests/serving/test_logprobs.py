"""logprobs / top_logprobs: the engine's values against the slow twin (a full forward of the whole sequence,
no cache, log_softmax by hand), then the official `openai` client reading them from both routes,
streamed and not."""
import math

import pytest
import torch

from indexcache.engine import Engine, SamplingParams
from indexcache.engine.generate import naive_generate

MODEL = "indexcache-tiny"
TOL = 1e-4   # fp32: the engine's cached, chunked forward vs one uncached forward of the whole sequence


def tok(tokenizer, t):
    return tokenizer.decode([t], skip_special_tokens=False)   # as the server shows a token, special or not


@torch.no_grad()
def reference_logprobs(model, prompt: list[int], output: list[int], pattern: str | None = None):
    """Per output token: (its logprob, the top-5 (id, logprob)), from one uncached forward over prompt+output."""
    logits = model(torch.tensor([prompt + output]), pattern=pattern)[0]            # (T, V)
    out = []
    for i, token in enumerate(output):
        row = logits[len(prompt) - 1 + i].double()
        logp = row - torch.logsumexp(row, dim=-1)                                   # (V,)
        order = sorted(range(len(logp)), key=lambda t: -float(logp[t]))[:5]
        out.append((float(logp[token]), [(t, float(logp[t])) for t in order]))
    return out


def test_engine_logprobs_equal_an_uncached_forward_on_fresh_prompts(model, random_prompts):
    engine = Engine(model, max_batch_size=3, chunk_size=7, max_model_len=96)
    prompts = random_prompts(4, lo=5, hi=30)   # fresh every run
    params = [SamplingParams(max_new_tokens=9, logprobs=5),
              SamplingParams(max_new_tokens=9, temperature=0.9, seed=3, logprobs=2),   # sampled: raw-logit logprobs
              SamplingParams(max_new_tokens=9, logprobs=0),
              SamplingParams(max_new_tokens=9)]                                          # not asked: none computed
    chunks = {i: [] for i in range(4)}
    for i, (p, sp) in enumerate(zip(prompts, params)):
        engine.submit(p, sp, chunks[i].append)
    while engine.step():
        pass
    for i, (p, sp) in enumerate(zip(prompts, params)):
        got = [c for c in chunks[i] if c.token_id is not None]
        output = [c.token_id for c in got]
        assert output == naive_generate(model, p, sp)
        if sp.logprobs is None:
            assert all(c.logprob is None and c.top_logprobs is None for c in got)
            continue
        for c, (want, want_top) in zip(got, reference_logprobs(model, p, output)):
            assert abs(c.logprob - want) < TOL
            assert len(c.top_logprobs) == sp.logprobs
            assert [t for t, _ in c.top_logprobs] == [t for t, _ in want_top[:sp.logprobs]]
            assert all(abs(a - b) < TOL for (_, a), (_, b) in zip(c.top_logprobs, want_top))
            assert c.logprob <= 0 and (not c.top_logprobs or c.top_logprobs[0][1] >= c.logprob - TOL)


def _reference_for(serve_app, model, tokenizer, ids, n):
    pattern = serve_app.server().info.remote().result()["pattern"]
    output = naive_generate(model, ids, SamplingParams(max_new_tokens=n, stop_token_ids=tuple(tokenizer.stop_token_ids)),
                            pattern=pattern)
    output = [t for t in output if t not in tokenizer.stop_token_ids]
    return output, reference_logprobs(model, ids, output, pattern)


def test_the_openai_client_reads_completion_logprobs_streamed_and_not(serve_app, model, tokenizer):
    client = serve_app.client()
    prompt = "logprobs of the index cache"
    output, ref = _reference_for(serve_app, model, tokenizer, tokenizer.encode(prompt), 12)
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert lp.tokens == [tokenizer.decode([t]) for t in output] and "".join(lp.tokens) == r.choices[0].text
    assert len(lp.token_logprobs) == r.usage.completion_tokens == len(output)
    assert all(abs(a - b) < TOL for a, (b, _) in zip(lp.token_logprobs, ref))
    for top, (_, want_top) in zip(lp.top_logprobs, ref):
        assert list(top) == [tok(tokenizer, t) for t, _ in want_top[:3]]
        assert all(abs(top[tok(tokenizer, t)] - v) < TOL for t, v in want_top[:3])
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    # streamed: the same entries, spread over the chunks, offsets running on
    tokens, values, offsets = [], [], []
    for chunk in client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0, logprobs=3,
                                           stream=True):
        if chunk.choices and chunk.choices[0].logprobs:
            tokens += chunk.choices[0].logprobs.tokens
            values += chunk.choices[0].logprobs.token_logprobs
            offsets += chunk.choices[0].logprobs.text_offset
    assert tokens == lp.tokens and offsets == lp.text_offset
    assert all(abs(a - b) < 1e-9 for a, b in zip(values, lp.token_logprobs))
    # not asked: null, as before
    assert client.completions.create(model=MODEL, prompt=prompt, max_tokens=2).choices[0].logprobs is None


def test_the_openai_client_reads_chat_logprobs_streamed_and_not(serve_app, model, tokenizer):
    client = serve_app.client()
    messages = [{"role": "user", "content": "hello logprobs"}]
    output, ref = _reference_for(serve_app, model, tokenizer, tokenizer.apply_chat_template(messages), 10)
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0, logprobs=True,
                                       top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert [c.token for c in content] == [tokenizer.decode([t]) for t in output]
    assert "".join(c.token for c in content) == r.choices[0].message.content
    for c, (want, want_top) in zip(content, ref):
        assert abs(c.logprob - want) < TOL and c.bytes == list(c.token.encode())
        assert [t.token for t in c.top_logprobs] == [tok(tokenizer, t) for t, _ in want_top[:2]]
        assert all(abs(t.logprob - v) < TOL for t, (_, v) in zip(c.top_logprobs, want_top))
    # logprobs without top_logprobs: the chosen tokens only
    bare = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0,
                                          logprobs=True).choices[0].logprobs.content
    assert [c.token for c in bare] == [c.token for c in content] and all(c.top_logprobs == [] for c in bare)
    streamed = []
    for chunk in client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0,
                                                logprobs=True, top_logprobs=2, stream=True):
        if chunk.choices and chunk.choices[0].logprobs:
            streamed += chunk.choices[0].logprobs.content
    assert [(c.token, c.logprob) for c in streamed] == [(c.token, c.logprob) for c in content]
    assert math.isclose(sum(c.logprob for c in streamed), sum(c.logprob for c in content), abs_tol=1e-9)


def test_logprobs_out_of_range_are_refused_naming_the_field(serve_app):
    import openai
    client = serve_app.client()
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="x", logprobs=21)
    assert e.value.body["param"] == "logprobs"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], top_logprobs=3)
    assert e.value.body["param"] == "top_logprobs" and "logprobs: true" in e.value.body["message"]
