"""The proxy (`frugal serve`, a real process) in front of two real vLLM engines, driven by the
official openai SDK: sync and async, streamed and not, completions, models, errors."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import yaml
from openai import AsyncOpenAI, OpenAI

from proxy.demo.launcher import free_port
from proxy.settings import Settings

pytestmark = pytest.mark.e2e

QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]


@pytest.fixture
def proxy_url(e2e_settings: Settings, tmp_path: Path) -> Iterator[str]:
    port = free_port()
    raw = e2e_settings.model_dump(mode="json", exclude_none=True)
    raw["server"]["port"] = port
    raw["policies"] = None
    config = tmp_path / "frugal.yaml"
    config.write_text(yaml.safe_dump(raw))
    log = (tmp_path / "proxy.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy", "serve", "--config", str(config)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, (tmp_path / "proxy.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(url + "/readyz", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            assert time.monotonic() < deadline, "proxy never became ready"
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def sync_client(url: str) -> OpenAI:
    return OpenAI(base_url=url + "/v1", api_key="demo", timeout=180, max_retries=0)


def test_models_lists_auto_and_both_engines(proxy_url: str) -> None:
    ids = [m.id for m in sync_client(proxy_url).models.list()]
    assert ids[0] == "auto"
    assert {"smollm2-135m", "qwen2.5-coder-0.5b"} <= set(ids)


def test_sync_chat_non_streamed_through_auto(proxy_url: str) -> None:
    raw = sync_client(proxy_url).chat.completions.with_raw_response.create(
        model="auto", messages=QUESTION, max_tokens=12, temperature=0
    )
    completion = raw.parse()
    assert completion.choices[0].message.content
    assert completion.usage is not None and completion.usage.completion_tokens > 0
    assert raw.headers["x-frugal-engine"] in {"small", "large"}
    assert "@" in raw.headers["x-frugal-model-version"]


def test_sync_chat_streamed_on_the_large_engine(proxy_url: str) -> None:
    stream = sync_client(proxy_url).chat.completions.create(
        model="qwen2.5-coder-0.5b",
        messages=[{"role": "user", "content": "Write a Python hello world."}],
        max_tokens=24,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    text, finish, usage = "", None, None
    for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage is not None:
            usage = chunk.usage
    assert text.strip()
    assert finish in {"stop", "length"}
    assert usage is not None and usage.completion_tokens > 0


def test_completions_endpoint(proxy_url: str) -> None:
    completion = sync_client(proxy_url).completions.create(
        model="smollm2-135m", prompt="The sky is", max_tokens=8, temperature=0
    )
    assert completion.choices[0].text


async def test_async_client_streamed_and_not(proxy_url: str) -> None:
    client = AsyncOpenAI(base_url=proxy_url + "/v1", api_key="demo", timeout=180, max_retries=0)
    completion = await client.chat.completions.create(
        model="smollm2-135m", messages=QUESTION, max_tokens=8, temperature=0
    )
    assert completion.choices[0].message.content
    stream = await client.chat.completions.create(
        model="smollm2-135m", messages=QUESTION, max_tokens=8, temperature=0, stream=True
    )
    pieces = [c.choices[0].delta.content or "" async for c in stream if c.choices]
    assert "".join(pieces).strip()
    await client.close()


def test_unknown_model_is_a_not_found_error(proxy_url: str) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        sync_client(proxy_url).chat.completions.create(model="gpt-17", messages=QUESTION)
    assert err.value.status_code == 404
    assert isinstance(err.value.body, dict) and err.value.body.get("code") == "model_not_found"


def test_bad_request_is_a_bad_request_error(proxy_url: str) -> None:
    with pytest.raises(openai.BadRequestError):
        sync_client(proxy_url).chat.completions.create(
            model="smollm2-135m", messages=QUESTION, temperature=7
        )
