"""Unit tests for proxy.cache.guards (pure lexical mismatch features and vetoes)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.cache import guards

texts = st.text(
    alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=0, max_size=80
)
questions = st.sampled_from(
    [
        "How do I reverse a list in Python?",
        "Why doesn't my laptop turn on?",
        "What is 15% of 80?",
        "What is the capital of Australia?",
        "best time to visit Japan",
        "",
        "???",
    ]
)


@pytest.mark.parametrize(
    ("query", "candidate", "veto"),
    [
        ("Why does my laptop turn on?", "Why doesn't my laptop turn on?", "negation"),
        ("Which foods contain gluten?", "Which foods do not contain gluten?", "negation"),
        ("What is 15% of 80?", "What is 25% of 80?", "number"),
        ("Convert 100 F to C", "Convert 90 F to C", "number"),
        ("What is the capital of Australia?", "What is the capital of Austria?", "entity"),
        ("How do I get a visa for Germany?", "How do I get a visa for Canada?", "entity"),
        ("How do I sort a list in python", "How do I reverse a list in python", "opposite"),
        ("set up cron daily on ubuntu", "set up cron weekly on ubuntu", "opposite"),
        ("How do I enable 2FA?", "How do I disable 2FA?", "opposite"),
        ("Why is my code slow?", "Why is my code fast?", "opposite"),
        ("How do I uppercase a string in Go?", "How do I lowercase a string in Go?", "opposite"),
        ("How can I sleep more?", "How can I sleep less?", "opposite"),
        (
            "Why was my visa application accepted?",
            "Why was my visa application rejected?",
            "opposite",
        ),
        ("Is it better to wake up early?", "Is it better to wake up late?", "opposite"),
        ("How do I push to a remote branch?", "How do I pull from a remote branch?", "opposite"),
        ("What does git reset --hard do?", "What does git reset --soft do?", "opposite"),
        (
            "How to check if a key exists in a map",
            "How to check if a value exists in a map",
            "opposite",
        ),
        (
            "What's the difference between == and === in JS?",
            "What's the difference between = and == in JS?",
            "operator",
        ),
        ("What does ~ mean in C++?", "What does % mean in C++?", "operator"),
        ("Convert Celsius to Kelvin", "Convert Kelvin to Celsius", "order"),
        ("Is Rust faster than Go?", "Is Go faster than Rust?", "order"),
        ("copy files from a server to my pc", "copy files from my pc to a server", "order"),
        ("Is this mushroom safe to eat?", "Is this mushroom unsafe to eat?", "prefix"),
        ("How do I install Node on Windows?", "How do I uninstall Node on Windows?", "prefix"),
        ("Is it possible to undo a merge?", "Is it impossible to undo a merge?", "prefix"),
        ("Explain how TCP works.", "Explain how TCP works in detail.", "instruction"),
        ("Explain how TCP works briefly", "Explain how TCP works in great detail", "instruction"),
        ("How do I set up a VPN?", "How do I set up a VPN, step by step?", "instruction"),
        (
            "List the planets of the solar system",
            "List the planets of the solar system as JSON",
            "instruction",
        ),
        ("What does HTTP 418 mean?", "What does HTTP 418 mean? Reply in Spanish.", "instruction"),
        ("Return the users table as CSV", "Return the users table as JSON", "instruction"),
        (
            "Explain closures in JavaScript",
            "Explain closures in JavaScript with examples",
            "instruction",
        ),
        ("Explain quantum computing.", "Explain quantum computing like I'm five.", "instruction"),
        ("Tell me about black holes.", "Tell me about black holes in simple terms.", "instruction"),
        (
            "Write an email asking for a day off.",
            "Write a formal email asking for a day off.",
            "instruction",
        ),
        (
            "Write a cover letter for a data job.",
            "Write a short cover letter for a data job.",
            "instruction",
        ),
    ],
)
def test_vetoes_fire_on_minimal_pairs(query: str, candidate: str, veto: str) -> None:
    assert veto in guards.vetoes(query, candidate)
    assert veto in guards.vetoes(candidate, query)


@pytest.mark.parametrize(
    ("query", "candidate"),
    [
        ("How do I reverse a list in Python?", "python: reverse a list"),
        ("What is 15% of 80?", "How much is fifteen percent of 80?"),
        ("What is 1,000 + 1?", "what is 1000 + 1"),
        ("How can I reduce my sex drive?", "How can I lower my sex drive?"),
        ("Can I add images to Quora?", "How do I add an image to Quora?"),
        ("What happens if I don't pay my bill?", "What happens if I do not pay my bill?"),
        ("What is the capital of Australia?", "Australia's capital city?"),
        (
            "Do Christians in Kerala have Jewish ancestry?",
            "Do Syrian Christians in Kerala have Jewish ancestry?",
        ),
        # the same words, each directional word still leading to the same one
        ("From Paris, how do I get to Lyon?", "How do I get to Lyon from Paris?"),
        ("In Python, how do I reverse a list?", "How do I reverse a list in Python?"),
        ("How do I convert Celsius to Fahrenheit?", "how do i convert celsius into fahrenheit"),
        # a prefixed opposite, but not a minimal pair: the head decides
        ("Is it safe to swim after eating?", "swimming right after a big meal: unsafe or fine?"),
    ],
)
def test_no_veto_on_paraphrases(query: str, candidate: str) -> None:
    assert guards.vetoes(query, candidate) == ()


@pytest.mark.parametrize(
    ("query", "candidate"),
    [
        # the same instruction in other words
        ("Explain RSA in two sentences", "two-sentence explanation of RSA"),
        ("JSON: return fields id and url only", "Return only id and url as JSON"),
        ("Describe photosynthesis in detail", "Give an in-depth description of photosynthesis"),
        # words of instructions used as the topic, not as an instruction
        ("Should I use who or whom in this sentence?", "How can we use who or whom in a sentence?"),
        ("How do I make a table in Word?", "How can I insert a table in Word?"),
        ("What is the longest word in English?", "What's the longest English word?"),
        ("Are these two sentences grammatically correct?", "Are these sentences grammatical?"),
        ("python one line if statement", "python if statement on one line"),
        # tone and length words that are the topic, not an instruction
        ("What is the best short story about love?", "What is the best story about love?"),
        ("How do I improve professional email writing?", "How do I improve email writing?"),
        ("What is the best book for beginners to learn Java?", "best book to learn Java"),
    ],
)
def test_answer_instructions_in_other_words_do_not_veto(query: str, candidate: str) -> None:
    assert "instruction" not in guards.vetoes(query, candidate)


def test_punctuation_is_not_an_operator() -> None:
    assert guards.vetoes("Python - how to reverse a list", "Python: how to reverse a list") == ()
    assert guards.parse("x += 1 if a != b, 2 * 3").operators == frozenset({"+=", "!="})


def test_numbers_are_canonical() -> None:
    assert guards.parse("pay 1,000.50 now").numbers == frozenset({"1000.5"})
    assert guards.parse("007 agents").numbers == frozenset({"7"})
    assert guards.parse("two apples and 2 pears").numbers == frozenset({"2"})


def test_first_word_capital_is_not_an_entity() -> None:
    assert guards.parse("Where is the station?").entities == frozenset()
    assert guards.parse("Where is Paris?").entities == frozenset({"paris"})
    assert "node.js" in guards.parse("install node.js on a server").entities


@given(questions, questions)
def test_features_have_the_declared_shape_and_range(query: str, candidate: str) -> None:
    row = guards.features(query, candidate)
    assert len(row) == len(guards.FEATURE_NAMES)
    assert all(0.0 <= x <= 1.0 for x in row)


@given(texts, texts)
def test_features_and_vetoes_are_symmetric(query: str, candidate: str) -> None:
    assert guards.features(query, candidate) == guards.features(candidate, query)
    assert set(guards.vetoes(query, candidate)) == set(guards.vetoes(candidate, query))


@given(texts)
def test_identical_texts_never_veto(text: str) -> None:
    assert guards.vetoes(text, text) == ()
    named = dict(zip(guards.FEATURE_NAMES, guards.features(text, text), strict=True))
    assert named["negation_mismatch"] == 0.0
    assert named["number_mismatch"] == 0.0
    assert named["entity_mismatch"] == 0.0
    assert named["content_jaccard"] == 1.0


undirected_words = st.lists(
    st.sampled_from(["reverse", "list", "python", "sort", "dict", "fast", "copy", "file", "how"]),
    min_size=2,
    max_size=8,
)


@given(undirected_words, st.randoms(use_true_random=False))
def test_word_order_alone_never_vetoes_without_a_directional_word(
    words: list[str], rng: object
) -> None:
    shuffled = list(words)
    rng.shuffle(shuffled)  # type: ignore[attr-defined]
    assert "order" not in guards.vetoes(" ".join(words), " ".join(shuffled))


@given(st.sampled_from(sorted(guards.DIRECTIONAL)), st.sampled_from(["celsius", "java", "phone"]))
def test_swapping_the_ends_of_a_directional_word_vetoes(word: str, other: str) -> None:
    query = f"convert kelvin {word} {other}"
    candidate = f"convert {other} {word} kelvin"
    assert "order" in guards.vetoes(query, candidate)
    assert "order" not in guards.vetoes(query, query)


@given(st.text())
def test_has_words_needs_one_letter_or_digit_and_nothing_else_counts(text: str) -> None:
    # padding with whitespace, punctuation, control characters or emoji never makes words
    padded = " \t\u0000" + text + " ?! 👍 ∰"
    assert guards.has_words(padded) == guards.has_words(text)
    for letter in ("a", "7", "ß", "日", "٣"):
        assert guards.has_words(text + letter)
    assert not guards.has_words("".join(c for c in padded if not c.isalnum()))
