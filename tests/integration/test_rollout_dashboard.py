"""The dashboard's per-version table, in a real browser, for an engine with a canary."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.conftest import StartFake, StartProxy
from tests.integration.test_dashboard import CHROMIUM, OUTPUT, HeadlessChromium
from tests.integration.test_rollout import ask, conversation, start_pair

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs /usr/bin/chromium"),
]

READ_ROLLOUT = """(() => ({
  hidden: document.getElementById("rollout-panel").hidden,
  rows: [...document.querySelectorAll("#rollout-table [data-version]")].map((n) => ({
    engine: n.dataset.engine, version: n.dataset.version, role: n.dataset.role,
    requests: Number(n.dataset.requests)})),
  state: document.getElementById("rollout-state").textContent,
}))()"""


async def test_dashboard_shows_each_versions_figures(
    start_fake: StartFake, start_proxy: StartProxy, tmp_path: Path
) -> None:
    _, _, proxy = await start_pair(start_fake, start_proxy, tmp_path, share=0.4, cache=False)
    for i in range(60):
        assert (await ask(proxy, conversation(i)))[0] == 200
    base = str(proxy.client.make_url("")).rstrip("/")
    async with HeadlessChromium() as browser:
        page = await browser.open(base + "/dashboard")
        await page.wait_for("document.body && Number(document.body.dataset.polls) >= 1")
        shown = await page.evaluate(READ_ROLLOUT)
        await page.screenshot(OUTPUT / "dashboard_rollout_1280.png", width=1280)
    status = proxy.services.rollouts.status("small")
    expected = {v: row["figures"]["requests"] for v, row in status["versions"].items()}
    assert not shown["hidden"]
    assert {r["version"]: r["requests"] for r in shown["rows"]} == expected
    assert sum(expected.values()) == 60
    assert {r["role"] for r in shown["rows"]} == {"stable", "canary"}
    assert "small: canary at 40.0%" in shown["state"]
