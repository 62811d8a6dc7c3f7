"""The fake engine: vLLM wire shapes, deterministic answers, failure knobs, request log."""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp.test_utils import TestClient
from hypothesis import given
from hypothesis import strategies as st

from proxy.engines.fake import (
    FakeEngineOptions,
    apply_overrides,
    apply_stop,
    create_fake_engine_app,
    parse_fail_spec,
)
from proxy.sse import parse_all
from tests.integration.conftest import StartFake, StartProxy, engine_config

Client = TestClient[Any, Any]
MODEL = "fake-small"


@pytest.fixture
async def client(aiohttp_client: Any) -> Client:
    app = create_fake_engine_app(FakeEngineOptions(model=MODEL, rng_seed=7))
    result: Client = await aiohttp_client(app)
    return result


def chat(content: str = "What is the capital of France?", **fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], **fields}


async def post_json(client: Client, path: str, body: dict[str, Any]) -> tuple[int, Any]:
    async with client.post(path, json=body) as resp:
        return resp.status, await resp.json(content_type=None)


async def answer_text(client: Client, body: dict[str, Any]) -> str:
    status, data = await post_json(client, "/v1/chat/completions", body)
    assert status == 200, data
    text: str = data["choices"][0]["message"]["content"]
    return text


async def stream_payloads(client: Client, path: str, body: dict[str, Any]) -> list[Any]:
    async with client.post(path, json={**body, "stream": True}) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        raw = await resp.read()
    payloads = parse_all(raw)
    assert payloads[-1] == b"[DONE]"
    return [orjson.loads(p) for p in payloads[:-1]]


async def configure(client: Client, **overrides: Any) -> None:
    async with client.post("/fake/config", json=overrides) as resp:
        assert resp.status == 200, await resp.text()


async def fake_log(client: Client) -> dict[str, Any]:
    async with client.get("/fake/requests") as resp:
        data: dict[str, Any] = await resp.json()
        return data


async def wait_for(client: Client, key: str, value: int) -> dict[str, Any]:
    # The server notices a client's departure asynchronously; poll (bounded) instead of sleeping.
    for _ in range(200):
        log = await fake_log(client)
        if log[key] == value:
            return log
        await asyncio.sleep(0.01)
    raise AssertionError(f"{key} never reached {value}: {log}")


# --- wire shapes ------------------------------------------------------------------------------


async def test_chat_non_streamed_has_vllm_shape(client: Client) -> None:
    status, data = await post_json(client, "/v1/chat/completions", chat(temperature=0))
    assert status == 200
    assert data["id"].startswith("chatcmpl-")
    assert data["object"] == "chat.completion"
    assert data["model"] == MODEL
    (choice,) = data["choices"]
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"]
    assert choice["finish_reason"] == "stop"
    usage = data["usage"]
    assert usage["completion_tokens"] == 16  # the default natural length
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


async def test_max_tokens_cuts_with_length(client: Client) -> None:
    _, data = await post_json(client, "/v1/chat/completions", chat(temperature=0, max_tokens=4))
    assert data["usage"]["completion_tokens"] == 4
    assert data["choices"][0]["finish_reason"] == "length"
    assert len(data["choices"][0]["message"]["content"].split()) == 4
    _, data = await post_json(
        client, "/v1/chat/completions", chat(temperature=0, max_completion_tokens=3)
    )
    assert data["usage"]["completion_tokens"] == 3


async def test_n_gives_distinct_choices(client: Client) -> None:
    _, data = await post_json(client, "/v1/chat/completions", chat(temperature=0, n=3))
    assert [c["index"] for c in data["choices"]] == [0, 1, 2]
    assert len({c["message"]["content"] for c in data["choices"]}) == 3
    assert data["usage"]["completion_tokens"] == 48


async def test_several_prompts_get_n_choices_each_as_vllm_numbers_them(client: Client) -> None:
    one = {"model": MODEL, "temperature": 0, "max_tokens": 4, "n": 2}
    _, data = await post_json(client, "/v1/completions", {**one, "prompt": ["red", "blue", [1, 2]]})
    assert [c["index"] for c in data["choices"]] == list(range(6))
    # choice i * n + j is prompt i's j-th answer: the same as that prompt sent alone
    for i, prompt in enumerate(["red", "blue", [1, 2]]):
        _, alone = await post_json(client, "/v1/completions", {**one, "prompt": prompt})
        texts = [c["text"] for c in alone["choices"]]
        assert [c["text"] for c in data["choices"][2 * i : 2 * i + 2]] == texts
    assert data["usage"]["completion_tokens"] == 6 * 4
    # an array of token ids is one prompt
    _, ids = await post_json(client, "/v1/completions", {**one, "prompt": [5, 6, 7]})
    assert len(ids["choices"]) == 2


async def test_stop_string_truncates(client: Client) -> None:
    full = await answer_text(client, chat(temperature=0))
    third_word = full.split()[2]
    first_two = " " + " ".join(full.split()[:2])
    # The stop string may also occur earlier (a short word inside another); the answer must end
    # before its first occurrence and never contain it.
    _, data = await post_json(
        client, "/v1/chat/completions", chat(temperature=0, stop=[" " + third_word])
    )
    text = data["choices"][0]["message"]["content"]
    assert data["choices"][0]["finish_reason"] == "stop"
    assert " " + third_word not in text
    assert first_two.startswith(text)


async def test_answers_are_deterministic_per_prompt(client: Client) -> None:
    a1 = await answer_text(client, chat("alpha", temperature=0))
    a2 = await answer_text(client, chat("alpha", temperature=0))
    b = await answer_text(client, chat("beta", temperature=0))
    assert a1 == a2
    assert a1 != b
    s1 = await answer_text(client, chat("alpha", seed=1, temperature=0.8))
    s1_again = await answer_text(client, chat("alpha", seed=1, temperature=0.8))
    s2 = await answer_text(client, chat("alpha", seed=2, temperature=0.8))
    assert s1 == s1_again
    assert s1 != s2


async def test_sampled_answers_vary(client: Client) -> None:
    texts = {await answer_text(client, chat("alpha", temperature=0.7)) for _ in range(3)}
    assert len(texts) == 3


async def test_chat_stream_matches_non_streamed(client: Client) -> None:
    body = chat(temperature=0, stream_options={"include_usage": True})
    chunks = await stream_payloads(client, "/v1/chat/completions", body)
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    finish = chunks[-2]["choices"][0]
    assert finish["finish_reason"] == "stop"
    usage_chunk = chunks[-1]
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"]["completion_tokens"] == 16
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1])
    assert streamed == await answer_text(client, chat(temperature=0))


async def test_stream_without_usage_option_has_no_usage_chunk(client: Client) -> None:
    chunks = await stream_payloads(client, "/v1/chat/completions", chat(temperature=0))
    assert all("usage" not in c for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


async def test_completions_streamed_and_not(client: Client) -> None:
    body = {"model": MODEL, "prompt": "Once upon a time", "temperature": 0, "max_tokens": 5}
    status, data = await post_json(client, "/v1/completions", body)
    assert status == 200
    assert data["id"].startswith("cmpl-")
    assert data["object"] == "text_completion"
    assert data["choices"][0]["finish_reason"] == "length"
    chunks = await stream_payloads(client, "/v1/completions", body)
    assert "".join(c["choices"][0]["text"] for c in chunks) == data["choices"][0]["text"]
    assert all("delta" not in c["choices"][0] for c in chunks)


async def test_slow_mode_streams_the_same_answer(client: Client) -> None:
    fast = await stream_payloads(client, "/v1/chat/completions", chat(temperature=0))
    await configure(client, ttft_ms=5, tokens_per_s=2000)
    slow = await stream_payloads(client, "/v1/chat/completions", chat(temperature=0))
    assert [c["choices"] for c in slow] == [c["choices"] for c in fast]


async def test_streamed_and_non_streamed_take_the_same_time(client: Client) -> None:
    # n=2, 6 tokens each at 5 tokens/s: 5 waits of 0.2 s either way (1 s). Pacing per SSE event
    # made the stream wait for every choice's chunk, finish chunk and usage chunk (3 s). A loaded
    # machine's event-loop stalls only add time: the bound leaves them 1.5 s, still under 3 s.
    await configure(client, tokens_per_s=5)
    body = chat(n=2, max_tokens=6, stream_options={"include_usage": True})
    elapsed = {}
    for stream in (False, True):
        start = time.perf_counter()
        async with client.post("/v1/chat/completions", json={**body, "stream": stream}) as resp:
            assert resp.status == 200
            await resp.read()
        elapsed[stream] = time.perf_counter() - start
    assert 1.0 <= elapsed[False] < 2.5, elapsed
    assert 1.0 <= elapsed[True] < 2.5, elapsed


async def test_models_health_and_metrics(client: Client) -> None:
    async with client.get("/v1/models") as resp:
        models = await resp.json()
    (card,) = models["data"]
    assert card["id"] == MODEL
    assert card["root"] == MODEL
    assert card["max_model_len"] == 4096
    assert card["owned_by"] == "vllm"
    async with client.get("/health") as resp:
        assert resp.status == 200
    async with client.get("/metrics") as resp:
        text = await resp.text()
    for series in (
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:gpu_cache_usage_perc",
        "vllm:kv_cache_usage_perc",
    ):
        assert f'{series}{{model_name="{MODEL}"}} 0.0' in text


async def test_metrics_reflect_in_flight_requests(client: Client) -> None:
    await configure(client, hang=True, max_num_seqs=1)
    pending = [
        asyncio.create_task(post_json(client, "/v1/chat/completions", chat())) for _ in range(2)
    ]
    await wait_for(client, "in_flight", 2)
    async with client.get("/metrics") as resp:
        text = await resp.text()
    assert f'vllm:num_requests_running{{model_name="{MODEL}"}} 1.0' in text
    assert f'vllm:num_requests_waiting{{model_name="{MODEL}"}} 1.0' in text
    await configure(client, hang=False)
    results = await asyncio.gather(*pending)
    assert [status for status, _ in results] == [200, 200]
    assert (await fake_log(client))["in_flight"] == 0


# --- errors and failure knobs -----------------------------------------------------------------


async def test_bad_requests(client: Client) -> None:
    async with client.post("/v1/chat/completions", data=b"{not json") as resp:
        assert resp.status == 400
        assert (await resp.json())["error"]["type"] == "BadRequestError"
    status, data = await post_json(client, "/v1/chat/completions", {"model": MODEL})
    assert status == 400
    status, data = await post_json(client, "/v1/chat/completions", chat(model="other"))
    assert status == 404
    assert data["error"]["type"] == "NotFoundError"
    status, _ = await post_json(client, "/v1/chat/completions", chat(n=0))
    assert status == 400


@pytest.mark.parametrize(
    ("path", "field", "value"),
    [
        ("/v1/chat/completions", "stop", 5),
        ("/v1/chat/completions", "stop", [1]),
        ("/v1/completions", "stop", [" a", None]),
        ("/v1/chat/completions", "max_tokens", "x"),
        ("/v1/completions", "max_completion_tokens", 0),
        ("/v1/chat/completions", "seed", "s"),
        ("/v1/chat/completions", "temperature", "hot"),
        ("/v1/chat/completions", "stream_options", {"include_usage": "yes"}),
        ("/v1/chat/completions", "messages", ["hi"]),
        ("/v1/completions", "prompt", {"text": "hi"}),
    ],
)
async def test_a_field_of_the_wrong_type_is_a_400_naming_it(
    client: Client, path: str, field: str, value: Any
) -> None:
    # vLLM answers these 400; a 500 here became a 502 and a breaker failure behind the proxy.
    base = chat() if path.endswith("chat/completions") else {"model": MODEL, "prompt": "hi"}
    for stream in (False, True):
        status, data = await post_json(client, path, {**base, "stream": stream, field: value})
        assert status == 400
        assert data == {
            "error": {
                "message": data["error"]["message"],
                "type": "BadRequestError",
                "param": field,
                "code": 400,
            }
        }
        assert f"'{field}'" in data["error"]["message"]
    assert (await fake_log(client))["requests"][-1]["outcome"] == "bad_request"


async def test_a_bad_field_reaches_a_client_of_the_proxy_as_the_engines_400(
    start_fake: StartFake, start_proxy: StartProxy
) -> None:
    engine = await start_fake("m")
    proxy = await start_proxy([engine_config("e", "m", [engine.url])])
    # (a field the proxy does not check itself: the engine's judgement reaches the client)
    body = {"model": "m", "prompt": "hi", "max_completion_tokens": 0}
    resp = await proxy.client.post("/v1/completions", json=body)
    assert resp.status == 400  # was a 502: the fake crashed with a plain-text 500
    error = (await resp.json())["error"]
    assert (error["type"], error["param"]) == ("BadRequestError", "max_completion_tokens")


async def test_fail_every_request(client: Client) -> None:
    await configure(client, fail_fraction=1.0, fail_status=503)
    status, data = await post_json(client, "/v1/chat/completions", chat())
    assert status == 503
    assert data == {
        "error": {
            "message": "injected failure",
            "type": "InternalServerError",
            "param": None,
            "code": 503,
        }
    }
    assert (await fake_log(client))["failed"] == 1


async def test_fail_a_fraction(client: Client) -> None:
    await configure(client, fail_fraction=0.5)
    statuses = [(await post_json(client, "/v1/chat/completions", chat()))[0] for _ in range(40)]
    assert set(statuses) == {200, 500}


async def test_abort_mid_stream_cuts_the_connection(client: Client) -> None:
    await configure(client, abort_after_chunks=3)
    received = b""
    with pytest.raises(aiohttp.ClientPayloadError):
        async with client.post("/v1/chat/completions", json=chat(stream=True)) as resp:
            assert resp.status == 200
            async for piece in resp.content.iter_any():
                received += piece
    assert len(parse_all(received)) == 3
    assert (await fake_log(client))["cut"] == 1


async def test_abort_cuts_non_streamed_before_any_byte(client: Client) -> None:
    await configure(client, abort_after_chunks=0)
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await post_json(client, "/v1/chat/completions", chat())


async def test_hang_then_client_timeout_counts_as_aborted(client: Client) -> None:
    await configure(client, hang=True)
    timeout = aiohttp.ClientTimeout(total=0.2)
    with pytest.raises(asyncio.TimeoutError):
        async with client.post("/v1/chat/completions", json=chat(), timeout=timeout) as resp:
            await resp.read()
    log = await wait_for(client, "aborted", 1)
    assert log["requests"][-1]["outcome"] == "aborted"
    assert log["in_flight"] == 0


async def test_client_leaving_mid_stream_is_counted(client: Client) -> None:
    await configure(client, tokens_per_s=50, completion_tokens=200)
    async with client.post("/v1/chat/completions", json=chat(stream=True)) as resp:
        await resp.content.readline()  # the first event has started arriving
        resp.close()  # leave without reading the rest
    await wait_for(client, "aborted", 1)


async def test_health_failure_is_settable(client: Client) -> None:
    await configure(client, health_fail=True)
    async with client.get("/health") as resp:
        assert resp.status == 503
    await configure(client, health_fail=False)
    async with client.get("/health") as resp:
        assert resp.status == 200


async def test_config_rejects_unknown_or_start_only_fields(client: Client) -> None:
    for bad in ({"nonsense": 1}, {"model": "other"}, {"fail_fraction": 2.0}):
        async with client.post("/fake/config", json=bad) as resp:
            assert resp.status == 400
    async with client.get("/fake/config") as resp:
        assert (await resp.json())["model"] == MODEL


# --- the request log --------------------------------------------------------------------------


async def test_request_log_keeps_body_and_headers(client: Client) -> None:
    body = chat(temperature=0, some_new_field={"keep": True})
    headers = {"X-Request-Id": "req-123"}
    async with client.post("/v1/chat/completions", json=body, headers=headers) as resp:
        assert resp.status == 200
    log = await fake_log(client)
    assert log["count"] == 1
    (entry,) = log["requests"]
    assert entry["path"] == "/v1/chat/completions"
    assert entry["body"] == body
    assert entry["headers"]["x-request-id"] == "req-123"
    assert entry["outcome"] == "ok"
    async with client.post("/fake/reset") as resp:
        assert resp.status == 204
    log = await fake_log(client)
    assert log["count"] == 0
    assert log["requests"] == []


# --- pure parts -------------------------------------------------------------------------------


def test_parse_fail_spec() -> None:
    assert parse_fail_spec("503:0.25,health") == {
        "fail_status": 503,
        "fail_fraction": 0.25,
        "health_fail": True,
    }
    assert parse_fail_spec("500") == {"fail_status": 500, "fail_fraction": 1.0}
    assert parse_fail_spec("hang, abort:3") == {"hang": True, "abort_after_chunks": 3}
    assert parse_fail_spec("end:2") == {"end_after_chunks": 2}
    for ok_status in ("200", "399", "600"):  # (200 was taken as a "failure")
        with pytest.raises(ValueError, match="400-599"):
            parse_fail_spec(ok_status)
    for bad in ("abort", "abort:x", "sometimes", "hang:1"):
        with pytest.raises(ValueError):
            parse_fail_spec(bad)


def test_apply_overrides_validates() -> None:
    options = FakeEngineOptions()
    assert apply_overrides(options, {"ttft_ms": 3}).ttft_ms == 3
    with pytest.raises(ValueError):
        apply_overrides(options, {"model": "x"})
    with pytest.raises(ValueError):
        apply_overrides(options, {"fail_fraction": -0.1})
    # (each of these was taken: a NaN delay never ends, a string "no" turned hang on)
    bad: list[dict[str, object]] = [
        {"ttft_ms": math.nan},
        {"tokens_per_s": math.nan},
        {"ttft_ms": math.inf},
        {"hang": "no"},
        {"health_fail": 1},
        {"abort_after_chunks": True},
        {"end_after_chunks": 2.5},
    ]
    for overrides in bad:
        with pytest.raises(ValueError):
            apply_overrides(options, overrides)


@given(
    tokens=st.lists(st.sampled_from([" a", " b", " ab", " c"]), max_size=12),
    stop=st.lists(st.sampled_from(["a", " b", "c ", "zz", ""]), max_size=3),
)
def test_apply_stop_returns_a_prefix_without_the_stop_string(
    tokens: list[str], stop: list[str]
) -> None:
    kept, stopped = apply_stop(tokens, stop)
    assert kept == tokens[: len(kept)]
    text = "".join(kept)
    assert not any(s and s in text for s in stop)
    if not stopped:
        assert kept == tokens
