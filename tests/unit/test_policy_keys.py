"""Keys: hashing, constant-time checks, authentication, model and max_tokens rules, `keys add`."""

from __future__ import annotations

import io
import re
import shutil
import tempfile
import threading
from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from proxy.policy.commands import append_key, key_entry_yaml, keys_add_command
from proxy.policy.errors import MaxTokensTooLarge, MissingKey, ModelNotAllowed, UnknownKey
from proxy.policy.keys import bearer_token, generate_key, hash_key, verify_key
from proxy.policy.loader import load_policy_dir
from proxy.policy.policyset import PolicySet, cap_max_tokens, resolve_model
from proxy.policy.schema import TierPolicy, is_key_hash

REPO_POLICIES = Path(__file__).resolve().parents[2] / "policies"


def policy(tier: str = "free", **overrides: object) -> TierPolicy:
    raw: dict[str, object] = {
        "tier": tier,
        "models": ["auto", "smollm2-135m"],
        "limits": {"max_tokens": 512},
        "routing": {"strong_share": 0.1},
        "latency": {"ttft_p95_ms": 3000},
        "priority": 1,
    }
    raw.update(overrides)
    return TierPolicy.model_validate(raw)


def test_hash_key_shape_and_generated_keys_differ() -> None:
    key = generate_key()
    assert key.startswith("sk-frugal-") and len(key) > 40
    assert is_key_hash(hash_key(key))
    assert generate_key() != key
    assert (
        hash_key("abc") == "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    )


@given(st.text(min_size=1), st.text(min_size=1))
def test_verify_key_accepts_exactly_the_hashed_keys(raw: str, other: str) -> None:
    assert verify_key(raw, [hash_key(other), hash_key(raw)])
    assert verify_key(raw, [hash_key(other)]) == (raw == other)
    assert not verify_key(raw, [])


def test_bearer_token_parsing() -> None:
    assert bearer_token("Bearer sk-1") == "sk-1"
    assert bearer_token("bearer   sk-1 ") == "sk-1"
    assert bearer_token("Basic abc") is None
    assert bearer_token("Bearer") is None
    assert bearer_token(None) is None


def test_open_set_serves_everyone_anonymously() -> None:
    policies = PolicySet.build({"free": policy()}, {})
    assert policies.is_open
    for key in (None, "", "sk-anything"):
        principal = policies.authenticate(key)
        assert (principal.tier, principal.tenant, principal.anonymous) == (
            "free",
            "anonymous",
            True,
        )


def test_closed_set_requires_a_known_key() -> None:
    acme = hash_key("sk-acme")
    policies = PolicySet.build(
        {
            "free": policy(keys=[hash_key("sk-free")]),
            "pro": policy("pro", keys=[{"hash": acme, "tenant": "acme"}], priority=5),
        },
        {},
    )
    assert not policies.is_open
    with pytest.raises(MissingKey) as missing:
        policies.authenticate(None)
    assert missing.value.status == 401
    with pytest.raises(UnknownKey) as unknown:
        policies.authenticate("sk-nope")
    assert (unknown.value.status, unknown.value.code) == (401, "invalid_api_key")
    principal = policies.authenticate("sk-acme")
    assert (principal.tier, principal.tenant, principal.key_hash) == ("pro", "acme", acme)
    assert policies.authenticate("sk-free").tier == "free"


def test_models_default_and_allow_list() -> None:
    free = policy()
    assert resolve_model(free, "auto") == "auto"
    assert resolve_model(free, "smollm2-135m") == "smollm2-135m"
    with pytest.raises(ModelNotAllowed) as refused:
        resolve_model(free, "qwen2.5-coder-0.5b")
    assert (refused.value.status, refused.value.param) == (403, "model")


@given(st.integers(min_value=1, max_value=10_000) | st.none())
def test_max_tokens_clamp_never_exceeds_the_cap(requested: int | None) -> None:
    decision = cap_max_tokens(policy(), requested)
    assert decision.value <= 512
    assert decision.clamped == (requested is not None and requested > 512)
    assert decision.defaulted == (requested is None)
    if requested is not None and requested <= 512:
        assert decision.value == requested


def test_max_tokens_reject_policy() -> None:
    strict = policy(limits={"max_tokens": 100, "on_max_tokens": "reject"})
    assert cap_max_tokens(strict, 100).value == 100
    with pytest.raises(MaxTokensTooLarge) as refused:
        cap_max_tokens(strict, 101)
    assert (refused.value.status, refused.value.param) == (400, "max_tokens")


def test_retry_after_header_rounds_up() -> None:
    assert MissingKey("x").retry_after_header is None
    assert MissingKey("x", retry_after=0.2).retry_after_header == "1"
    assert MissingKey("x", retry_after=6.01).retry_after_header == "7"


# --- appending a key to a file as text ----------------------------------------------------------

HASHES = st.integers(min_value=0, max_value=2**256 - 1).map(lambda n: f"sha256:{n:064x}")


@st.composite
def policy_texts(draw: st.DrawFn) -> tuple[str, list[str]]:
    """A policy file with a keys list in one of the shapes people write, plus its hashes."""
    existing = draw(st.lists(HASHES, max_size=3, unique=True))
    style = draw(st.sampled_from(["flow", "block", "indentless", "absent", "null"]))
    comment = "  # owned by ops" if draw(st.booleans()) else ""
    if style == "flow":
        keys = "keys: [" + ", ".join(f'"{h}"' for h in existing) + "]" + comment + "\n"
    elif style == "absent" or (style == "null" and not existing):
        existing = []
        keys = "" if style == "absent" else "keys:" + comment + "\n"
    elif style == "null":
        existing = []
        keys = "keys: ~\n"
    else:
        pad = "  " if style == "block" else ""
        keys = "keys:" + comment + "\n" + "".join(f'{pad}- "{h}"{comment}\n' for h in existing)
        if not existing:
            keys = "keys: []\n"
    text = "# Tier: free\ntier: free\n" + keys + "# the models\nmodels: [auto]\npriority: 1\n"
    if draw(st.booleans()):
        text = text.rstrip("\n")
    return text, existing


@given(policy_texts(), HASHES, st.sampled_from([None, "acme"]))
def test_append_key_adds_one_entry_and_keeps_the_rest(
    case: tuple[str, list[str]], new: str, tenant: str | None
) -> None:
    text, existing = case
    edited = append_key(text, key_entry_yaml(new, tenant, None))
    data = yaml.safe_load(edited)
    hashes = [k if isinstance(k, str) else k["hash"] for k in data["keys"]]
    assert hashes == [*existing, new]
    assert data["models"] == ["auto"] and data["tier"] == "free" and data["priority"] == 1
    kept = [line for line in text.splitlines() if line.startswith("#")]
    assert [line for line in edited.splitlines() if line.startswith("#")] == kept


def test_keys_add_command_issues_a_working_key(tmp_path: Path) -> None:
    folder = tmp_path / "policies"
    shutil.copytree(REPO_POLICIES, folder)
    before = (folder / "pro.yaml").read_text()
    out, err = io.StringIO(), io.StringIO()
    assert keys_add_command("pro", tenant="acme", directory=folder, out=out, err=err) == 0
    key = out.getvalue().strip()
    assert re.fullmatch(r"sk-frugal-[A-Za-z0-9_-]{43}", key)
    after = (folder / "pro.yaml").read_text()
    assert key not in after and hash_key(key) in after
    # Only the keys line changed; every comment and other line is where it was.
    removed = set(before.splitlines()) - set(after.splitlines())
    assert removed == {"keys: []"}
    result = load_policy_dir(folder)
    assert result.policies is not None
    principal = result.policies.authenticate(key)
    assert (principal.tier, principal.tenant) == ("pro", "acme")
    assert not list(folder.glob(".*"))  # no temp file left behind


def test_keys_add_refuses_unknown_tier_and_invalid_folder(tmp_path: Path) -> None:
    folder = tmp_path / "policies"
    shutil.copytree(REPO_POLICIES, folder)
    out, err = io.StringIO(), io.StringIO()
    assert keys_add_command("gold", directory=folder, out=out, err=err) == 1
    assert out.getvalue() == "" and "no tier 'gold'" in err.getvalue()
    free = folder / "free.yaml"
    free.write_text(free.read_text().replace("priority: 1", "priority: one"))
    before = {p.name: p.read_text() for p in folder.iterdir()}
    assert keys_add_command("pro", directory=folder, out=out, err=err) == 1
    assert out.getvalue() == ""
    assert {p.name: p.read_text() for p in folder.iterdir()} == before


def test_a_key_with_bytes_that_are_not_utf8_is_unknown_not_a_crash() -> None:
    """A header's non-UTF-8 bytes arrive as surrogates (aiohttp decodes with surrogateescape)."""
    raw = "sk-\udcff\udcfe"
    assert is_key_hash(hash_key(raw))
    assert not verify_key(raw, [hash_key("sk-acme")])
    policies = PolicySet.build({"free": policy(keys=[hash_key("sk-acme")])}, {})
    with pytest.raises(UnknownKey):
        policies.authenticate(raw)


def test_keys_added_at_once_are_all_kept(tmp_path: Path) -> None:
    """Two `frugal keys add` at once each read the file, append and replace it: without a lock
    the last writer dropped the other's key, whose owner had been shown a key that never worked."""
    folder = tmp_path / "policies"
    shutil.copytree(REPO_POLICIES, folder)
    start = threading.Barrier(6)
    outs = [io.StringIO() for _ in range(6)]

    def add(out: io.StringIO) -> None:
        start.wait()
        assert keys_add_command("pro", directory=folder, out=out, err=io.StringIO()) == 0

    threads = [threading.Thread(target=add, args=(out,)) for out in outs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    result = load_policy_dir(folder)
    assert result.policies is not None
    for out in outs:
        assert result.policies.authenticate(out.getvalue().strip()).tier == "pro"
    assert result.policies.key_count == 6


def test_keys_add_to_a_folder_it_cannot_write_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "policies"
    shutil.copytree(REPO_POLICIES, folder)
    before = (folder / "pro.yaml").read_text()

    def refused(*_: object, **__: object) -> None:
        raise PermissionError(13, "Permission denied", str(folder))

    # (as root a chmod does not stop the write; the temp file is where it fails otherwise)
    monkeypatch.setattr(tempfile, "mkstemp", refused)
    out, err = io.StringIO(), io.StringIO()
    assert keys_add_command("pro", directory=folder, out=out, err=err) == 1
    assert out.getvalue() == ""  # no key shown that was never stored
    [line] = err.getvalue().splitlines()
    assert line.startswith(f"{folder / 'pro.yaml'}: cannot write: Permission denied")
    assert (folder / "pro.yaml").read_text() == before
