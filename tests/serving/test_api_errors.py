"""Bad input through the running app (Ray Serve, the tiny model): every failure is a 4xx in OpenAI's error
shape naming the field, never a 5xx, and the replica keeps answering correctly.

The cases issue 20 found by hand are named regression tests; a property-based fuzz (hypothesis, seeded and
bounded) then throws thousands of generated bad bodies at both routes."""
import json
import random

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from indexcache.engine import SamplingParams
from indexcache.engine.generate import generate
from indexcache.serving.protocol import _UNSUPPORTED, ChatCompletionRequest, CompletionRequest

MODEL = "indexcache-tiny"
COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"


@pytest.fixture(scope="module")
def http(serve_app):
    with httpx.Client(base_url=serve_app.url, headers={"Authorization": f"Bearer {serve_app.api_key}"},
                      timeout=30) as client:
        yield client


def post(http, route, body) -> httpx.Response:
    """body: a dict (sent as JSON, non-ASCII escaped, so lone surrogates travel as \\udXXX) or raw bytes."""
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return http.post(route, content=raw, headers={"content-type": "application/json"})


def assert_openai_error(r: httpx.Response, status: int | None = None, param: str | None = None) -> dict:
    assert r.status_code < 500, (r.status_code, r.text)
    assert status is None or r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json"), r.headers
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"], body
    assert isinstance(body["error"]["type"], str)
    if param is not None:
        assert body["error"]["param"] == param, body
    return body["error"]


def alive_and_correct(serve_app, model, tokenizer, prompt="still right"):
    """The replica answers a greedy request with exactly the reference generation."""
    r = serve_app.client().completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0)
    want = generate(model, [tokenizer.encode(prompt)],
                    SamplingParams(max_new_tokens=8, stop_token_ids=tuple(tokenizer.stop_token_ids)),
                    pattern=serve_app.server().info.remote().result()["pattern"])[0]
    assert r.choices[0].text == tokenizer.decode(want)


# ---------------------------------------------------------------------------------------------------
# the cases of issue 20, one test each
# ---------------------------------------------------------------------------------------------------
def test_a_lone_surrogate_is_a_400_naming_the_field_not_a_500(http):
    for route, body, param in ((COMPLETIONS, {"prompt": "\ud800"}, "prompt"),
                               (CHAT, {"messages": [{"role": "user", "content": "hi \udfff"}]}, "messages[0].content")):
        raw = json.dumps(body).encode()
        assert b"\\ud" in raw   # what the wire carries: an escaped surrogate
        err = assert_openai_error(post(http, route, raw), 400, param)
        assert "surrogate" in err["message"]


def test_a_seed_outside_64_bits_is_a_400_naming_seed(http):
    for seed in (2 ** 64, -2 ** 63 - 1, 10 ** 30):
        assert_openai_error(post(http, COMPLETIONS, {"prompt": "x", "seed": seed}), 400, "seed")
    for seed in (2 ** 64 - 1, -2 ** 63):   # the edges torch takes are accepted
        assert post(http, COMPLETIONS, {"prompt": "x", "seed": seed, "max_tokens": 1}).status_code == 200


def test_text_parts_content_is_accepted_like_a_string(http):
    parts = post(http, CHAT, {"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
                              "max_tokens": 6, "temperature": 0})
    plain = post(http, CHAT, {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 6, "temperature": 0})
    assert parts.status_code == plain.status_code == 200, parts.text
    assert parts.json()["choices"][0]["message"] == plain.json()["choices"][0]["message"]
    assert parts.json()["usage"] == plain.json()["usage"]
    image = {"type": "image_url", "image_url": {"url": "http://x/y.png"}}
    err = assert_openai_error(post(http, CHAT, {"messages": [{"role": "user", "content": [image]}]}), 400,
                              "messages[0].content")
    assert "only 'text' parts" in err["message"]


def test_invalid_utf8_and_invalid_json_get_the_openai_error_shape(http):
    for raw, says in ((b'{"prompt": "\xff\xfe"}', "UTF-8"), (b"{not json", "not valid JSON"), (b"", "empty"),
                      (b"[1, 2]", "JSON object"), (b'{"prompt": "x", "temperature": NaN}', "NaN"),
                      (b'{"prompt": "x", "max_tokens": 1e999}', "64-bit float"), (b"[" * 50000, "nested")):
        for route in (COMPLETIONS, CHAT):
            err = assert_openai_error(post(http, route, raw), 400, "body")
            assert says in err["message"], (raw[:20], err)


def test_roles_outside_the_five_are_refused(http):
    for role in ("<|im_start|>", "System", "function", "", "root"):
        err = assert_openai_error(post(http, CHAT, {"messages": [{"role": role, "content": "x"}]}), 400,
                                  "messages[0].role")
        assert "'developer'" in err["message"]
    for role in ("system", "user", "assistant", "developer", "tool"):
        r = post(http, CHAT, {"messages": [{"role": role, "content": "x"}], "max_tokens": 1})
        assert r.status_code == 200, (role, r.text)


def test_types_are_strict_not_coerced(http):
    for route, body, param in (
            (COMPLETIONS, {"prompt": "x", "stream": 0}, "stream"),
            (COMPLETIONS, {"prompt": "x", "n": True}, "n"),
            (COMPLETIONS, {"prompt": [True]}, "prompt"),
            (COMPLETIONS, {"prompt": "x", "max_tokens": "8"}, "max_tokens"),
            (COMPLETIONS, {"prompt": "x", "max_tokens": 8.0}, "max_tokens"),
            (COMPLETIONS, {"prompt": "x", "temperature": "0.5"}, "temperature"),
            (COMPLETIONS, {"prompt": "x", "logprobs": True}, "logprobs"),
            (CHAT, {"messages": [{"role": "user", "content": "x"}], "stream": "yes"}, "stream"),
            (CHAT, {"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
            (CHAT, {"messages": [{"role": "user", "content": "x"}], "logprobs": 1}, "logprobs"),
            (CHAT, {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs")):
        assert_openai_error(post(http, route, body), 400, param)


def test_tools_and_response_format_are_refused_as_not_supported(http):
    msgs = [{"role": "user", "content": "x"}]
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    for body, param in (({"tools": [tool]}, "tools"), ({"response_format": {"type": "json_object"}}, "response_format"),
                        ({"tool_choice": "auto"}, "tool_choice"), ({"presence_penalty": 0.5}, "presence_penalty"),
                        ({"logit_bias": {"5": 10}}, "logit_bias")):
        err = assert_openai_error(post(http, CHAT, {"messages": msgs, **body}), 400, param)
        assert "not supported" in err["message"] and err["code"] == "unsupported_parameter"
    # their defaults are harmless and accepted
    ok = post(http, CHAT, {"messages": msgs, "max_tokens": 1, "response_format": {"type": "text"}, "tools": [],
                           "presence_penalty": 0})
    assert ok.status_code == 200, ok.text


def test_unknown_paths_and_methods_get_the_openai_error_shape(http):
    assert_openai_error(http.get("/v1/nothing"), 404)
    assert_openai_error(http.get(COMPLETIONS), 405)


def test_server_side_refusals_name_the_field(http):
    """What only the replica can judge (tokenizer, context) comes back as a 400 before any text."""
    err = assert_openai_error(post(http, COMPLETIONS, {"prompt": "caf\u00e9"}), 400, "prompt")
    assert "ASCII" in err["message"]
    err = assert_openai_error(post(http, COMPLETIONS, {"prompt": "x" * 300}), 400, "prompt")
    assert err["code"] == "context_length_exceeded"
    assert_openai_error(post(http, COMPLETIONS, {"prompt": [10 ** 6]}), 400, "prompt")
    assert_openai_error(post(http, COMPLETIONS, {"prompt": []}), 400, "prompt")


# ---------------------------------------------------------------------------------------------------
# the fuzz
# ---------------------------------------------------------------------------------------------------
_json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2 ** 70, 2 ** 70),
                          st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=12))
_json = st.recursive(_json_scalars, lambda kids: st.one_of(st.lists(kids, max_size=4),
                                                           st.dictionaries(st.text(max_size=6), kids, max_size=4)),
                     max_leaves=10)
_not_bool = _json.filter(lambda v: not isinstance(v, bool) and v is not None)
_not_int = _json.filter(lambda v: not (isinstance(v, int) and not isinstance(v, bool)) and v is not None)
_not_num = _json.filter(lambda v: (isinstance(v, bool) or not isinstance(v, (int, float))) and v is not None)
_surrogate_text = st.builds(lambda a, s, b: a + s + b, st.text(max_size=5),
                            st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), st.text(max_size=5))

# (field, values that must be refused for that field), shared by both routes
_BAD_COMMON = [
    ("temperature", st.one_of(_not_num, st.floats(max_value=-1e-9, allow_nan=False, allow_infinity=False),
                              st.floats(min_value=2.0001, allow_nan=False, allow_infinity=False))),
    ("top_p", st.one_of(_not_num, st.floats(max_value=0, allow_nan=False, allow_infinity=False),
                        st.floats(min_value=1.0001, allow_nan=False, allow_infinity=False))),
    ("seed", st.one_of(_not_int, st.integers(min_value=2 ** 64), st.integers(max_value=-2 ** 63 - 1))),
    ("stream", _not_bool),
    ("n", st.one_of(_not_int, st.integers().filter(lambda n: n != 1))),
    ("stop", st.one_of(st.lists(st.text(min_size=1), min_size=5, max_size=7),
                       st.lists(_json_scalars.filter(lambda v: not isinstance(v, str)), min_size=1, max_size=3),
                       st.just(""), st.just([""]), st.integers(), st.booleans())),
    ("max_tokens", st.one_of(_not_int, st.integers(max_value=-1))),
    ("model", _not_int.filter(lambda v: not isinstance(v, str))),
    ("tools", st.lists(_json, min_size=1, max_size=2)),
    ("response_format", st.sampled_from([{"type": "json_object"}, {"type": "json_schema", "json_schema": {}}])),
]
_BAD_COMPLETIONS = _BAD_COMMON + [
    ("prompt", st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False),
                         st.dictionaries(st.text(max_size=3), _json, max_size=2),
                         st.lists(st.one_of(st.booleans(), st.floats(allow_nan=False, allow_infinity=False),
                                            st.dictionaries(st.text(max_size=2), _json_scalars, max_size=1)),
                                  min_size=1, max_size=4),
                         _surrogate_text)),
    ("logprobs", st.one_of(_not_int, st.integers(min_value=21), st.integers(max_value=-1))),
]
_BAD_CHAT = _BAD_COMMON + [
    ("messages", st.one_of(st.just([]), _json_scalars, st.lists(_json_scalars, min_size=1, max_size=3))),
    ("messages[0].role", st.one_of(st.text(max_size=15).filter(lambda r: r not in
                                                                ("system", "user", "assistant", "developer", "tool")),
                                   _not_num.filter(lambda v: not isinstance(v, str)))),
    ("messages[0].content", st.one_of(st.integers(), st.booleans(), st.none(), _surrogate_text,
                                      st.lists(st.one_of(_json_scalars, st.fixed_dictionaries(
                                          {"type": st.sampled_from(["image_url", "input_audio", "file", ""])})),
                                          min_size=1, max_size=3))),
    ("logprobs", _not_bool),
    ("top_logprobs", st.one_of(_not_int, st.integers(min_value=21), st.integers(max_value=-1))),
]


KNOWN_FIELDS = set(CompletionRequest.model_fields) | set(ChatCompletionRequest.model_fields) | set(_UNSUPPORTED)


def _set(body: dict, field: str, value) -> dict:
    if field.startswith("messages[0]."):
        body["messages"][0][field.split(".", 1)[1]] = value
    else:
        body[field] = value
    return body


@st.composite
def bad_requests(draw):
    """(route, raw bytes, the param the error must name or None)."""
    route = draw(st.sampled_from([COMPLETIONS, CHAT]))
    kind = draw(st.sampled_from(["field"] * 6 + ["bytes", "not_object", "missing"]))
    if kind == "bytes":   # arbitrary bytes (which may even parse), or a JSON text cut short
        if draw(st.booleans()):
            return route, draw(st.binary(max_size=40)), None
        return route, b'{"prompt": "abc", "messages": [{"role": "user"}]}'[:draw(st.integers(0, 40))], "body"
    if kind == "not_object":
        value = draw(_json.filter(lambda v: not isinstance(v, dict)))
        return route, json.dumps(value).encode(), "body"
    if kind == "missing":   # an object without the one required field, plus random other keys
        extra = draw(st.dictionaries(st.text(max_size=8).filter(lambda k: k not in KNOWN_FIELDS), _json, max_size=3))
        return route, json.dumps(extra).encode(), "prompt" if route == COMPLETIONS else "messages"
    good = ({"prompt": "ok", "max_tokens": 1} if route == COMPLETIONS
            else {"messages": [{"role": "user", "content": "ok"}], "max_tokens": 1})
    field, values = draw(st.sampled_from(_BAD_COMPLETIONS if route == COMPLETIONS else _BAD_CHAT))
    body = _set(good, field, draw(values))
    if field == "top_logprobs" and draw(st.booleans()):
        body["logprobs"] = True   # out of range even with logprobs on
    param = field.split(".")[0] if field.startswith("messages") and not isinstance(body["messages"], list) else field
    return route, json.dumps(body).encode(), param


def test_fuzzed_bad_bodies_never_get_a_5xx_and_always_the_openai_error_shape(serve_app, http, model, tokenizer):
    pid = serve_app.server().info.remote().result()["replica_pid"]
    seen: dict[str, int] = {}

    @settings(max_examples=2000, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(bad_requests())
    def check(case):
        route, raw, param = case
        r = post(http, route, raw)
        err = assert_openai_error(r, 400)
        if param is not None:   # a field's error names that field (or the part of it that is wrong)
            assert err["param"] == param or err["param"].startswith(param), (raw[:200], err)
        seen[err["param"] or "-"] = seen.get(err["param"] or "-", 0) + 1

    check()
    assert sum(seen.values()) == 2000 and len(seen) >= 15, seen   # the fuzz reached every kind of field
    assert serve_app.server().info.remote().result()["replica_pid"] == pid   # no restart
    alive_and_correct(serve_app, model, tokenizer)
