"""The OpenAI API of a real `vllm serve` process: parity with the reference, streaming,
finish reasons, logprobs, chat, and a 400 naming the field for every bad input."""

from __future__ import annotations

import json
import math

import pytest
from expected import STOP_IDS, diffusion, prompt_logprobs, prompts

pytestmark = [pytest.mark.slow, pytest.mark.engine]


def _tokens(choice) -> list[int]:
    return list(choice["token_ids"])


def test_bare_serve_used_the_plugin_defaults(server):
    log = server.log.read_text()
    assert "TwoTower: diffusion mode" in log
    assert "kv_cache_memory_bytes (CPU)" in log  # started with no KV-cache flag or env


def test_completions_equal_reference(server, serve_reference):
    for prompt in prompts(4):
        body = dict(prompt=prompt, max_tokens=40, temperature=0, return_token_ids=True)
        (choice,) = server.completion(**body)["choices"]
        ids, _ = diffusion(serve_reference, prompt, 40)
        assert _tokens(choice) == ids
        assert choice["finish_reason"] == ("stop" if ids[-1] in STOP_IDS else "length")


def test_knobs_and_seeded_temperature_over_http(server, serve_reference):
    prompt = prompts(1, seed=3)[0]
    xargs = {"twotower_confidence_threshold": 0.5, "diffusion_max_steps": 8}
    body = dict(prompt=prompt, max_tokens=32, temperature=0.8, seed=7, return_token_ids=True)
    (choice,) = server.completion(**body, vllm_xargs=xargs)["choices"]
    ids, _ = diffusion(serve_reference, prompt, 32, 0.5, 8, temperature=0.8, seed=7)
    assert _tokens(choice) == ids


@pytest.mark.parametrize("max_tokens", [1, 15, 16, 17])
def test_max_tokens_exact(server, serve_reference, max_tokens):
    prompt = prompts(1, seed=4)[0]
    body = dict(prompt=prompt, max_tokens=max_tokens, return_token_ids=True)
    (choice,) = server.completion(**body)["choices"]
    ids, _ = diffusion(serve_reference, prompt, max_tokens)
    assert _tokens(choice) == ids
    if ids[-1] not in STOP_IDS:
        assert len(ids) == max_tokens and choice["finish_reason"] == "length"


def _stream(server, path, body) -> tuple[list[dict], str]:
    chunks = []
    with server.client.stream(
        "POST", path, json={"model": server.model, **body, "stream": True}
    ) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[6:]))
    text = "".join(
        c["choices"][0].get("text") or (c["choices"][0].get("delta") or {}).get("content") or ""
        for c in chunks
        if c.get("choices")
    )
    return chunks, text


def test_streaming_is_blockwise_and_equals_non_streaming(server):
    prompt = prompts(1, seed=5)[0]
    body = dict(prompt=prompt, max_tokens=48, return_token_ids=True)
    whole = server.completion(**body)["choices"][0]
    chunks, text = _stream(server, "/v1/completions", body)
    assert text == whole["text"]
    streamed = [t for c in chunks if c.get("choices") for t in c["choices"][0]["token_ids"] or []]
    assert streamed == whole["token_ids"]
    # Tokens arrive a committed block at a time (a final chunk may be cut at EOS/max_tokens).
    sizes = [len(c["choices"][0]["token_ids"]) for c in chunks if c["choices"][0]["token_ids"]]
    assert all(s == 16 for s in sizes[:-1]) and 1 <= sizes[-1] <= 16
    finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"][0]["finish_reason"]]
    assert finish == [whole["finish_reason"]]


def test_stop_string_and_stop_token(server):
    prompt = prompts(1, seed=6)[0]
    full = server.completion(prompt=prompt, max_tokens=48, return_token_ids=True)["choices"][0]
    ids = full["token_ids"]
    # A stop token from the middle of the output: the text ends before it, reason "stop".
    stop_id = ids[20]
    first = ids.index(stop_id)
    got = server.completion(
        prompt=prompt, max_tokens=48, stop_token_ids=[stop_id], return_token_ids=True
    )["choices"][0]
    assert got["finish_reason"] == "stop" and got["token_ids"] == ids[: first + 1]
    # A stop string taken from the text: output cut before it, streamed the same.
    text = full["text"]
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    want = text[: text.index(stop)]
    got = server.completion(prompt=prompt, max_tokens=48, stop=[stop])["choices"][0]
    assert (got["text"], got["finish_reason"]) == (want, "stop")
    chunks, streamed = _stream(
        server, "/v1/completions", dict(prompt=prompt, max_tokens=48, stop=[stop])
    )
    assert streamed == want
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_chat_with_template(server, serve_reference):
    messages = [{"role": "user", "content": "Say something."}]
    r = server.post(
        "/v1/chat/completions",
        dict(
            messages=messages, max_tokens=32, return_token_ids=True, logprobs=True, top_logprobs=2
        ),
    )
    assert r.status_code == 200, r.text
    body = r.json()
    choice = body["choices"][0]
    prompt_ids = (
        body["prompt_token_ids"] if "prompt_token_ids" in body else choice["prompt_token_ids"]
    )
    assert prompt_ids[0] == 10  # <|im_start|>: the template was applied
    ids, logprobs = diffusion(serve_reference, prompt_ids, 32)
    assert choice["token_ids"] == ids
    content = choice["logprobs"]["content"]
    assert len(content) == len(ids)
    for entry, want in zip(content, logprobs, strict=True):
        assert math.isclose(entry["logprob"], want, abs_tol=1e-4)
        assert len(entry["top_logprobs"]) == 2
        assert entry["top_logprobs"][0]["logprob"] >= entry["logprob"] - 1e-6
    chunks, text = _stream(server, "/v1/chat/completions", dict(messages=messages, max_tokens=32))
    assert text == choice["message"]["content"]


def test_n_greater_than_one(server):
    body = dict(prompt=prompts(1)[0], max_tokens=16, n=2, temperature=1.0, seed=3)
    choices = server.completion(**body, return_token_ids=True)["choices"]
    assert [c["index"] for c in choices] == [0, 1]
    # vLLM gives the children seeds 3 and 4: each equals the single request with that seed.
    for c, seed in zip(choices, (3, 4), strict=True):
        single = server.completion(**{**body, "n": 1, "seed": seed}, return_token_ids=True)
        assert c["token_ids"] == single["choices"][0]["token_ids"]


def test_sample_logprobs_are_commit_step_logprobs(server, serve_reference):
    prompt = prompts(1, seed=8)[0]
    body = dict(prompt=prompt, max_tokens=32, logprobs=3, return_token_ids=True)
    choice = server.completion(**body)["choices"][0]
    ids, want = diffusion(serve_reference, prompt, 32)
    assert choice["token_ids"] == ids
    lp = choice["logprobs"]
    assert len(lp["token_logprobs"]) == len(ids)
    for got, exp in zip(lp["token_logprobs"], want, strict=True):
        assert math.isclose(got, exp, abs_tol=1e-4)
    for top in lp["top_logprobs"]:
        assert 1 <= len(top) <= 4 and "<SPECIAL_3>" not in top  # the mask is never offered


def test_echo_prompt_logprobs_from_context_tower(server, serve_reference):
    # What lm-eval's loglikelihood requests send to a completions server.
    prompt = prompts(1, seed=9, lengths=(30,))[0]
    body = dict(prompt=prompt, max_tokens=1, echo=True, logprobs=1, temperature=0)
    lp = server.completion(**body)["choices"][0]["logprobs"]
    got = lp["token_logprobs"][: len(prompt)]
    assert got[0] is None
    want = prompt_logprobs(serve_reference, prompt)
    assert all(math.isclose(a, b, abs_tol=1e-4) for a, b in zip(got[1:], want, strict=True))
    # prompt_logprobs (vLLM's extension) agrees, with max_tokens 0 too.
    out = server.completion(prompt=prompt, max_tokens=0, echo=True, logprobs=0)
    assert out["choices"][0]["logprobs"]["token_logprobs"][1:] == pytest.approx(want, abs=1e-4)


BAD_XARGS = [
    ({"twotower_confidence_threshold": 0}, "twotower_confidence_threshold"),
    ({"twotower_confidence_threshold": -0.5}, "twotower_confidence_threshold"),
    ({"twotower_confidence_threshold": 1.5}, "twotower_confidence_threshold"),
    ({"twotower_confidence_threshold": "NaN"}, "twotower_confidence_threshold"),
    ({"twotower_confidence_threshold": "0.5"}, "twotower_confidence_threshold"),
    ({"twotower_confidence_threshold": [0.5]}, "twotower_confidence_threshold"),
    ({"diffusion_max_steps": 0}, "diffusion_max_steps"),
    ({"diffusion_max_steps": 17}, "diffusion_max_steps"),
    ({"diffusion_max_steps": 2.5}, "diffusion_max_steps"),
    ({"diffusion_canvas_length": 32}, "diffusion_canvas_length"),
    ({"twotower_bogus": 1}, "twotower_bogus"),
]

BAD_FIELDS = [
    (dict(temperature=0.7, top_p=0.5), "top_p"),
    (dict(temperature=0.7, top_k=5), "top_k"),
    (dict(temperature=0.7, min_p=0.1), "min_p"),
    (dict(presence_penalty=0.5), "presence_penalty"),
    (dict(frequency_penalty=0.5), "frequency_penalty"),
    (dict(repetition_penalty=1.2), "repetition_penalty"),
    (dict(logit_bias={"30": 5}), "logit_bias"),
    (dict(min_tokens=4), "min_tokens"),
    (dict(logprobs=100), "logprobs"),
    (dict(max_tokens=-1), "max_tokens"),
    (dict(temperature=-1), "temperature"),
]


def _assert_400(server, body, field):
    r = server.post("/v1/completions", {"prompt": [30, 31, 32], "max_tokens": 16, **body})
    assert r.status_code == 400, (body, r.status_code, r.text)
    assert field in r.json()["error"]["message"], r.text


@pytest.mark.parametrize(("xargs", "field"), BAD_XARGS)
def test_bad_knob_is_400_naming_it(server, xargs, field):
    _assert_400(server, {"vllm_xargs": xargs}, field)


def test_nan_threshold_is_400(server):
    # JSON has no NaN, but Python's json and some clients send the bare token anyway.
    raw = (
        '{"model": "%s", "prompt": [30], "max_tokens": 16, '
        '"vllm_xargs": {"twotower_confidence_threshold": NaN}}'
    )
    r = server.client.post(
        "/v1/completions", content=raw % server.model, headers={"content-type": "application/json"}
    )
    assert r.status_code == 400, r.text
    assert "twotower_confidence_threshold" in r.text or "JSON" in r.text


@pytest.mark.parametrize(("body", "field"), BAD_FIELDS)
def test_unsupported_sampling_field_is_400_naming_it(server, body, field):
    _assert_400(server, body, field)


def test_too_long_prompt_is_400_and_server_keeps_serving(server):
    r = server.post("/v1/completions", {"prompt": [30] * 600, "max_tokens": 16})
    assert r.status_code == 400, r.text
    # No room for one block before max_model_len (512): also a 400, naming max_model_len.
    r = server.post("/v1/completions", {"prompt": [30] * 500, "max_tokens": 16})
    assert r.status_code == 400 and "max_model_len" in r.text, r.text
    out = server.completion(prompt=[30, 31], max_tokens=16)
    assert out["usage"]["completion_tokens"] >= 1
