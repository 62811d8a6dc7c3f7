"""Both demo engines answer the official openai SDK directly (no proxy in between)."""

from __future__ import annotations

import pytest
from openai import OpenAI

from proxy.demo.launcher import RunningEngine

pytestmark = pytest.mark.e2e

ENGINE_NAMES = ["small", "large"]


def client_for(engine: RunningEngine) -> OpenAI:
    return OpenAI(base_url=f"{engine.url}/v1", api_key="not-checked", timeout=120, max_retries=0)


@pytest.mark.parametrize("name", ENGINE_NAMES)
def test_engine_lists_its_served_model(e2e_engines: dict[str, RunningEngine], name: str) -> None:
    engine = e2e_engines[name]
    ids = [model.id for model in client_for(engine).models.list()]
    assert ids == [engine.served_model]


@pytest.mark.parametrize("name", ENGINE_NAMES)
def test_engine_answers_chat_completion(e2e_engines: dict[str, RunningEngine], name: str) -> None:
    engine = e2e_engines[name]
    response = client_for(engine).chat.completions.create(
        model=engine.served_model,
        messages=[{"role": "user", "content": "What is the capital of France? One word."}],
        max_tokens=16,
        temperature=0,
    )
    choice = response.choices[0]
    assert response.model == engine.served_model
    assert choice.message.role == "assistant"
    assert choice.message.content and choice.message.content.strip()
    assert choice.finish_reason in {"stop", "length"}
    assert response.usage is not None
    assert 0 < response.usage.completion_tokens <= 16


@pytest.mark.parametrize("name", ENGINE_NAMES)
def test_engine_streams_chat_completion(e2e_engines: dict[str, RunningEngine], name: str) -> None:
    engine = e2e_engines[name]
    stream = client_for(engine).chat.completions.create(
        model=engine.served_model,
        messages=[{"role": "user", "content": "Count from one to five."}],
        max_tokens=24,
        temperature=0,
        stream=True,
    )
    pieces = []
    finish_reasons = []
    for chunk in stream:
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            if choice.finish_reason is not None:
                finish_reasons.append(choice.finish_reason)
    assert "".join(pieces).strip()
    assert finish_reasons and finish_reasons[-1] in {"stop", "length"}
