"""Quality (and cost) benchmark of the semantic cache's same-question decision.

Cache-style protocol: the cache holds query_a, then query_b is looked up; a pair is a *hit* when
the decision accepts the candidate. Precision = correct hits / hits, recall = correct hits /
same-question pairs. Everything is reported on the *report* part of cache_pairs_dev.csv.gz (the
part that scripts/train_verifier.py never trained or tuned on; same seeded hash split), per source,
beside a
plain-cosine baseline (base MiniLM, threshold only) computed in the same run. A hand-written set of
pairs of other kinds (coding, support, math with other numbers, negations, other named entities,
true paraphrases) checks that the verifier generalises beyond the dev sources.

Writes to --out (default out/cache_quality/): pr_<source>.png, pr_handwritten.png, results.md,
results.json. With --speed it also times the verification path (fused embedding pass, usearch ANN
search, guards + head, and with --cross the cross-encoder on the best candidate) at batch 1 and
batch 64. --cross measures the verifier with its cross-encoder (the setting cache.cross_encoder:
true); without it, the bi-encoder head alone (the default).

Usage:
  .venv/bin/python scripts/bench_cache_quality.py [--out out/cache_quality] [--speed] [--cross]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from train_verifier import DATA, SOURCES, TARGETS, Pair, load_pairs, log, part  # noqa: E402

from proxy.cache import guards, verifier  # noqa: E402

BASELINE_THRESHOLDS = (0.80, 0.90, 0.95)

# Hand-written pairs of other kinds: (cached question, incoming question, same question?).
HANDWRITTEN: tuple[tuple[str, str, int], ...] = (
    # coding: paraphrases
    ("How do I reverse a list in Python?", "python: reverse a list", 1),
    ("How can I read a file line by line in Python?", "read a text file line by line in python", 1),
    (
        "How do I undo the last git commit?",
        "git: revert my most recent commit that I haven't pushed",
        1,
    ),
    ("What's the difference between let and const in JavaScript?", "javascript let vs const", 1),
    ("How do I center a div horizontally with CSS?", "css center a div horizontally", 1),
    ("How to convert a string to an integer in Java?", "java parse string to int", 1),
    (
        "How do I check if a key exists in a Python dict?",
        "python check whether dictionary has key",
        1,
    ),
    (
        "How do I list all docker containers, including stopped ones?",
        "docker show all containers even stopped",
        1,
    ),
    # coding: near misses
    ("How do I reverse a list in Python?", "How do I sort a list in Python?", 0),
    ("How do I reverse a list in Python?", "How do I reverse a string in Python?", 0),
    ("How do I read a CSV file in Python?", "How do I write a CSV file in Python?", 0),
    (
        "How to convert a string to an integer in Java?",
        "How to convert a string to an integer in C#?",
        0,
    ),
    ("How do I undo the last git commit?", "How do I undo the last git push?", 0),
    (
        "How do I remove duplicates from a list in Python?",
        "How do I remove duplicates from a list in JavaScript?",
        0,
    ),
    ("sort a dict by value in python", "sort a dict by key in python", 0),
    ("How do I install numpy on Windows?", "How do I install numpy on Linux?", 0),
    ("How to create an index in PostgreSQL?", "How to drop an index in PostgreSQL?", 0),
    ("What does the yield keyword do in Python?", "What does the await keyword do in Python?", 0),
    # support: paraphrases
    ("How do I reset my password?", "I forgot my password, how can I change it?", 1),
    ("How can I cancel my subscription?", "I want to cancel my subscription, how do I do that?", 1),
    ("Where can I download my invoice?", "how to get a copy of my invoice", 1),
    ("How do I change the email address on my account?", "update account email address", 1),
    ("What are your customer support hours?", "when is customer support open?", 1),
    ("How long does shipping take?", "how many days does delivery usually take", 1),
    # support: near misses
    ("How do I reset my password?", "How do I reset my username?", 0),
    ("How can I cancel my subscription?", "How can I pause my subscription?", 0),
    ("How do I cancel my order?", "How do I return my order?", 0),
    ("Can I get a refund after 30 days?", "Can I get a refund after 14 days?", 0),
    ("How do I upgrade to the premium plan?", "How do I downgrade from the premium plan?", 0),
    ("Do you ship to Canada?", "Do you ship to Mexico?", 0),
    (
        "How do I enable two-factor authentication?",
        "How do I disable two-factor authentication?",
        0,
    ),
    # math with different numbers
    ("What is 15% of 80?", "What is 25% of 80?", 0),
    ("What is 12 times 7?", "What is 12 times 8?", 0),
    ("Convert 100 Fahrenheit to Celsius", "Convert 90 Fahrenheit to Celsius", 0),
    ("What is the square root of 144?", "What is the square root of 169?", 0),
    ("Solve 2x + 3 = 11", "Solve 2x + 5 = 11", 0),
    ("How many seconds are in 3 hours?", "How many seconds are in 4 hours?", 0),
    ("What is 15% of 80?", "How much is fifteen percent of 80?", 1),
    ("What is 12 times 7?", "12 x 7 = ?", 1),
    ("Convert 100 Fahrenheit to Celsius", "100 F in C", 1),
    # negations
    ("Why does my laptop turn on?", "Why doesn't my laptop turn on?", 0),
    ("Is coffee good for your health?", "Is coffee not good for your health?", 0),
    ("Which foods contain gluten?", "Which foods don't contain gluten?", 0),
    ("Should I use a VPN?", "Should I never use a VPN?", 0),
    ("Can dogs eat grapes?", "Why can't dogs eat grapes?", 0),
    (
        "What happens if I don't pay my credit card bill?",
        "What happens if I do not pay my credit card bill?",
        1,
    ),
    # different named entities
    ("What is the capital of Australia?", "What is the capital of Austria?", 0),
    (
        "Who was the first president of the United States?",
        "Who was the first president of France?",
        0,
    ),
    ("How do I get a work visa for Germany?", "How do I get a work visa for Canada?", 0),
    ("What is the population of Tokyo?", "What is the population of Osaka?", 0),
    (
        "When did Apple release the first iPhone?",
        "When did Samsung release the first Galaxy phone?",
        0,
    ),
    ("Best time to visit Japan", "Best time to visit Thailand", 0),
    ("What is the capital of Australia?", "Australia's capital city?", 1),
    ("Who wrote Pride and Prejudice?", "Pride and Prejudice author", 1),
    # general true paraphrases
    ("How do I lose weight fast?", "What is the quickest way to lose weight?", 1),
    ("What are the symptoms of the flu?", "flu symptoms", 1),
    ("How do I make cold brew coffee?", "cold brew coffee recipe", 1),
    ("What is the boiling point of water?", "At what temperature does water boil?", 1),
    ("How do I improve my sleep?", "tips for sleeping better", 1),
    ("Why is the sky blue?", "what makes the sky blue", 1),
)


# A second hand-written set, written after the guards' word lists were frozen and never used to
# change them: the first set above was written alongside the guards, so it flatters them.
HANDWRITTEN_BLIND: tuple[tuple[str, str, int], ...] = (
    ("How do I merge two dictionaries in Python?", "python combine two dicts into one", 1),
    ("How can I make an HTTP request in Node?", "send an http request from node.js", 1),
    ("How do I exit vim?", "how to quit the vim editor", 1),
    ("What is a closure in JavaScript?", "explain javascript closures", 1),
    ("How to find the length of an array in Go?", "golang get array length", 1),
    ("How do I rename a git branch?", "git rename branch", 1),
    ("How to kill a process on a port in Linux?", "linux free up a port used by a process", 1),
    ("How do I flatten a nested list in Python?", "How do I flatten a nested list in Ruby?", 0),
    ("How do I rename a git branch?", "How do I rename a git tag?", 0),
    ("How to find the length of an array in Go?", "How to find the capacity of a slice in Go?", 0),
    ("What is a closure in JavaScript?", "What is a promise in JavaScript?", 0),
    ("How do I make a GET request with curl?", "How do I make a POST request with curl?", 0),
    ("Convert a list to a set in Python", "Convert a set to a list in Python", 0),
    ("How do I track my package?", "where is my parcel, how can I track it", 1),
    (
        "Can I change my delivery address after ordering?",
        "update shipping address on an order I already placed",
        1,
    ),
    ("How do I delete my account?", "close my account permanently", 1),
    ("How do I delete my account?", "How do I recover my deleted account?", 0),
    (
        "Can I change my delivery address after ordering?",
        "Can I change my billing address after ordering?",
        0,
    ),
    ("Is there a student discount?", "Is there a military discount?", 0),
    ("What payment methods do you accept?", "Do you accept PayPal?", 0),
    ("How many calories are in 2 eggs?", "How many calories are in 3 eggs?", 0),
    ("What is 7 squared?", "What is 7 cubed?", 0),
    (
        "How many days until Christmas if today is December 1?",
        "How many days until Christmas if today is December 10?",
        0,
    ),
    ("What is 30 divided by 5?", "30 / 5 = ?", 1),
    ("What is 2 to the power of 10?", "2^10", 1),
    ("Is it safe to swim after eating?", "Is it unsafe to swim after eating?", 0),
    ("Why do cats purr?", "Why don't cats purr when they're sick?", 0),
    ("Should I learn Rust?", "Should I not learn Rust?", 0),
    ("Why is my phone not charging?", "my phone won't charge, why?", 1),
    ("Who is the CEO of Microsoft?", "Who is the CEO of Google?", 0),
    ("What is the tallest mountain in Africa?", "What is the tallest mountain in Europe?", 0),
    ("How far is the Moon from Earth?", "How far is Mars from Earth?", 0),
    ("What language is spoken in Brazil?", "What language is spoken in Argentina?", 0),
    ("What is the currency of Japan?", "Japan's currency?", 1),
    ("Who painted the Mona Lisa?", "Mona Lisa painter", 1),
    ("How do I get rid of hiccups?", "ways to stop hiccups", 1),
    ("What causes earthquakes?", "why do earthquakes happen", 1),
    ("How long should I boil an egg for a soft yolk?", "soft boiled egg cooking time", 1),
    (
        "How long should I boil an egg for a soft yolk?",
        "How long should I boil an egg for a hard yolk?",
        0,
    ),
    ("What are good exercises for lower back pain?", "What are good exercises for neck pain?", 0),
)

# A third set, written on 2026-11-29 before the word-order and prefix vetoes existed and never
# used to change them. Its author knew which kinds of pair those vetoes would target: 5 of its 20
# different-question pairs are of those kinds (operands swapped around "to"/"than"/"from", a
# negating prefix), the other 15 are not.
HANDWRITTEN_BLIND_2: tuple[tuple[str, str, int], ...] = (
    ("How do I undo a git rebase?", "revert a git rebase I just did", 1),
    ("How can I sort a dictionary by value in Python?", "python sort dict by its values", 1),
    ("What does HTTP status 404 mean?", "meaning of a 404 error", 1),
    ("How do I install Node.js on Ubuntu?", "install nodejs ubuntu", 1),
    ("How to remove duplicates from an array in JavaScript?", "javascript dedupe array", 1),
    ("How do I set an environment variable in Windows?", "windows set env variable", 1),
    ("What is the difference between TCP and UDP?", "tcp vs udp differences", 1),
    ("How do I cancel my subscription?", "stop my subscription from renewing", 1),
    ("How long does shipping take to Canada?", "delivery time to Canada", 1),
    ("How many ounces are in a pound?", "pound to ounces", 1),
    ("What is the speed of light?", "how fast does light travel", 1),
    ("Who discovered penicillin?", "penicillin discoverer", 1),
    ("How do I reset my password?", "forgot my password, how to reset it", 1),
    ("How do I convert Celsius to Fahrenheit?", "celsius to fahrenheit formula", 1),
    ("What is the largest ocean on Earth?", "biggest ocean in the world", 1),
    ("How do I get a stain out of a carpet?", "remove carpet stains", 1),
    ("How do I make my laptop battery last longer?", "extend laptop battery life", 1),
    ("How can I check which Python version I have?", "find my python version", 1),
    ("What time zone is Tokyo in?", "Tokyo time zone", 1),
    ("How do I split a string by commas in Java?", "java split string on comma", 1),
    ("How do I convert Celsius to Fahrenheit?", "How do I convert Fahrenheit to Celsius?", 0),
    ("Is Python faster than Java?", "Is Java faster than Python?", 0),
    (
        "How do I copy files from my phone to my laptop?",
        "How do I copy files from my laptop to my phone?",
        0,
    ),
    ("How do I install Docker on Mac?", "How do I uninstall Docker on Mac?", 0),
    (
        "Is it possible to run Windows apps on Linux?",
        "Is it impossible to run Windows apps on Linux?",
        0,
    ),
    (
        "How do I enable two-factor authentication?",
        "How do I disable two-factor authentication?",
        0,
    ),
    ("Why is my code so slow?", "Why is my code so fast?", 0),
    ("How do I undo a git rebase?", "How do I continue a git rebase?", 0),
    ("What is the capital of Canada?", "What is the largest city in Canada?", 0),
    ("How many ounces are in a pound?", "How many ounces are in a cup?", 0),
    ("How do I reset my password?", "How do I change my username?", 0),
    ("Who discovered penicillin?", "Who discovered insulin?", 0),
    ("How long does shipping take to Canada?", "How much does shipping cost to Canada?", 0),
    (
        "How do I split a string by commas in Java?",
        "How do I join a list of strings with commas in Java?",
        0,
    ),
    (
        "What is the difference between TCP and UDP?",
        "What is the difference between HTTP and HTTPS?",
        0,
    ),
    ("How can I check which Python version I have?", "How can I upgrade my Python version?", 0),
    (
        "How do I make my laptop battery last longer?",
        "How do I make my phone battery last longer?",
        0,
    ),
    ("What is the largest ocean on Earth?", "What is the smallest ocean on Earth?", 0),
    ("How do I get a stain out of a carpet?", "How do I get a stain out of a shirt?", 0),
    ("What time zone is Tokyo in?", "What time is it in Tokyo?", 0),
)

# Probes of kinds the dev file hardly has (chat instructions, everyday and technical near-misses,
# and paraphrases of those kinds), written on 2026-11-29 while adding the instruction and operator
# vetoes and the new opposite groups: the near-misses before those changes, the paraphrases after
# (a check that the new guards cost no right hit), then 8 audience/tone/length requests before
# those instruction kinds were added. Not blind to those guards.
HANDWRITTEN_PROBES: tuple[tuple[str, str, int], ...] = (
    ("How do I reverse a list in Python?", "¿Cómo invierto una lista en Python?", 0),
    ("What is the capital of France?", "Quelle est la capitale de la France ?", 0),
    ("What is the capital of France?", "What is the capital of France? Answer in one word.", 0),
    ("Explain how TCP works.", "Explain how TCP works in one sentence.", 0),
    ("Explain how TCP works.", "Explain how TCP works in detail, with examples.", 0),
    ("Write a haiku about autumn.", "Write a haiku about autumn in French.", 0),
    ("Summarize the plot of Hamlet.", "Summarize the plot of Hamlet in 3 bullet points.", 0),
    ("Translate 'good morning' to Spanish.", "Translate 'good morning' to German.", 0),
    ("What is 2+2?", "What is 2+3?", 0),
    ("List the planets of the solar system.", "List the planets of the solar system in JSON.", 0),
    (
        "How do I sort a dict by value in Python?",
        "How do I sort a dict by value in Python? Reply in Spanish.",
        0,
    ),
    ("What's the weather in Paris today?", "What's the weather in Paris tomorrow?", 0),
    ("What happened in the stock market yesterday?", "What happened in the stock market today?", 0),
    (
        "How do I get the first element of a list in Python?",
        "How do I get the last element of a list in Python?",
        0,
    ),
    (
        "What is the maximum value of an int in Java?",
        "What is the minimum value of an int in Java?",
        0,
    ),
    (
        "How do I remove duplicates from a list in Python?",
        "How do I find duplicates in a list in Python?",
        0,
    ),
    (
        "How do I convert a string to an int in Python?",
        "How do I convert an int to a string in Python?",
        0,
    ),
    ("What are the advantages of remote work?", "What are the disadvantages of remote work?", 0),
    ("How do I lose weight fast?", "How do I gain weight fast?", 0),
    ("Who was the first president of the USA?", "Who was the second president of the USA?", 0),
    ("How do I merge two dicts in Python 3?", "How do I merge two dicts in Python 2?", 0),
    (
        "How do I read a file line by line in Python?",
        "How do I write a file line by line in Python?",
        0,
    ),
    ("Best laptop for programming under $1000", "Best laptop for gaming under $1000", 0),
    ("How to center a div horizontally?", "How to center a div vertically?", 0),
    (
        "What is the time complexity of quicksort in the worst case?",
        "What is the time complexity of quicksort in the average case?",
        0,
    ),
    ("How do I uppercase a string in JavaScript?", "How do I lowercase a string in JavaScript?", 0),
    ("Why is my code slow?", "Why is my code fast?", 0),
    (
        "What is the difference between a list and a tuple?",
        "What is the difference between a tuple and a list?",
        1,
    ),
    ("How do I install Docker on Ubuntu?", "How do I install Docker on Ubuntu 22.04?", 0),
    ("What does git reset --hard do?", "What does git reset --soft do?", 0),
    (
        "What's the difference between == and === in JavaScript?",
        "What's the difference between = and == in JavaScript?",
        0,
    ),
    (
        "How do I check if a key exists in a dict in Python?",
        "How do I check if a value exists in a dict in Python?",
        0,
    ),
    ("How do I get the current date in Python?", "How do I get the current time in Python?", 0),
    ("How to exit vim?", "How to exit nano?", 0),
    ("How many calories are in an apple?", "How many calories are in a banana?", 0),
    (
        "What is the time complexity of O(n log n) sorting?",
        "What is the time complexity of O(n^2) sorting?",
        0,
    ),
    ("How do I make an http request in node?", "How do I make an http request in deno?", 0),
    ("How to kill a process on port 3000?", "How to find a process on port 3000?", 0),
    ("What does the -r flag do in rm?", "What does the -f flag do in rm?", 0),
    ("How do I center text in css?", "How do I justify text in css?", 0),
    ("Is it safe to eat raw eggs?", "Is it safe to eat raw chicken?", 0),
    ("how to compile c code with gcc", "how to compile c++ code with g++", 0),
    ("What is the capital of australia?", "What is the capital of austria?", 0),
    ("convert png to jpg", "convert jpg to png", 0),
    ("How do I push to a remote branch?", "How do I pull from a remote branch?", 0),
    ("How do I push my changes to GitHub?", "how can i push my code to github", 1),
    (
        "Explain how a hash map works in detail.",
        "Give a detailed explanation of how hash maps work, in detail.",
        1,
    ),
    ("What is the fastest way to learn Python?", "How can I learn Python fast?", 1),
    ("How do I make my website load faster?", "How can I speed up my website's loading time?", 1),
    ("Is it hard to learn Rust?", "Is Rust difficult to learn?", 1),
    ("How do I connect to a remote server with SSH?", "How to SSH into a remote server?", 1),
    ("What's the difference between TCP and UDP?", "TCP vs UDP: what's the difference?", 1),
    ("How do I convert a list to a set in Python?", "python: list to set conversion", 1),
    ("How do I check if a key exists in a Python dict?", "python check whether dict has a key", 1),
    (
        "Summarize the causes of World War I briefly.",
        "Briefly summarize what caused World War 1.",
        1,
    ),
    ("How do I read a CSV file with pandas?", "pandas read csv file", 1),
    ("What does === mean in JavaScript?", "What is the === operator in JavaScript?", 1),
    ("How can I lower my cholesterol?", "How do I reduce my cholesterol levels?", 1),
    ("Return the top 10 rows as JSON", "Give me the first 10 rows in JSON", 1),
    ("What are the pros and cons of remote work?", "Remote work: advantages and disadvantages?", 1),
    ("How do I make a static website with Hugo?", "Building a static site with Hugo", 1),
    ("Explain quantum computing.", "Explain quantum computing like I'm five.", 0),
    ("Explain recursion.", "Explain recursion to a 10 year old.", 0),
    ("What is machine learning?", "What is machine learning? Explain it for beginners.", 0),
    ("Write an email asking for a day off.", "Write a formal email asking for a day off.", 0),
    ("Write an email asking for a day off.", "Write a funny email asking for a day off.", 0),
    ("Describe the water cycle.", "Describe the water cycle for kids.", 0),
    ("Tell me about black holes.", "Tell me about black holes in simple terms.", 0),
    (
        "Write a cover letter for a software job.",
        "Write a short cover letter for a software job.",
        0,
    ),
)


# Pairs that differ only where MiniLM reads one unknown word piece ([UNK]: an emoji, a rare
# symbol, a word over 100 characters) and so embed alike (cosine 1.0), and paraphrases that keep
# the same unknown parts. Written on 2026-11-29 with the unknown-word veto and the no-words rule
# that these pairs exercise: not blind to them.
HANDWRITTEN_BLIND_SPOTS: tuple[tuple[str, str, int], ...] = (
    ("Is 🍎 healthy for dogs?", "Is 🍌 healthy for dogs?", 0),
    ("What does 🙏 mean in a text message?", "What does 🙌 mean in a text message?", 0),
    ("What does the ∰ symbol mean?", "What does the ∯ symbol mean?", 0),
    ("Rate this: 😀", "Rate this: 😡", 0),
    ("👍", "👎", 0),
    ("Decode this base64: " + "QUJD" * 30, "Decode this base64: " + "WFla" * 30, 0),
    ("Is 🍎 healthy for dogs?", "Are 🍎 good for dogs to eat?", 1),
    ("What does 🙏 mean in a text message?", "What is the meaning of 🙏 in texting?", 1),
    ("Rate this: 😀", "Give this a rating: 😀", 1),
    ("What does the ∰ symbol mean?", "What is the meaning of the ∰ symbol?", 1),
)
ENCODE_CHUNK = 64 * 32  # texts per progress line

WRITTEN_SETS = (
    "handwritten",
    "handwritten_blind",
    "handwritten_blind_2",
    "probes",
    "blind_spots",
)


@dataclass(frozen=True, slots=True)
class Scored:
    source: str
    label: int
    cosine: float
    score: float
    vetoed: bool  # by a guard, or a question past the encoder's window (matched exactly only)


def encode_cached(
    model: verifier.Verifier, texts: Sequence[str], cache_dir: Path | None
) -> verifier.EncodedBatch:
    """The fused pass over all texts, cached on disk by (texts, tuned layers)."""
    key = hashlib.sha256("\n".join(texts).encode("utf-8"))
    key.update(str(getattr(model.encoder, "precision", "reference")).encode())
    for name in sorted(model.encoder.tuned):
        key.update(model.encoder.tuned[name].numpy().tobytes())
    file = cache_dir / f"encoded-{key.hexdigest()[:16]}.npz" if cache_dir else None
    if file is not None and file.exists():
        data = np.load(file)
        log(f"encoding cache hit {file}")
        return verifier.EncodedBatch(data["base"], data["verifier"])
    started = time.time()
    # In length-sorted chunks, to show progress (the whole file takes minutes on a CPU). The
    # reference encoder sorts by length and batches by 64 itself, so chunks of a multiple of 64
    # in that order give it the very same batches: the same numbers as one call.
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    base = np.zeros((len(texts), verifier.HIDDEN), dtype=np.float32)
    tuned = np.zeros((len(texts), verifier.HIDDEN), dtype=np.float32)
    for begin in range(0, len(order), ENCODE_CHUNK):
        rows = order[begin : begin + ENCODE_CHUNK]
        part = model.encoder.encode([texts[i] for i in rows])
        base[rows], tuned[rows] = part.base, part.verifier
        log(f"  encoded {begin + len(rows):,} of {len(texts):,} ({time.time() - started:.0f}s)")
    encoded = verifier.EncodedBatch(base, tuned)
    log(f"encoded {len(texts)} texts in {time.time() - started:.0f}s")
    if file is not None:
        file.parent.mkdir(parents=True, exist_ok=True)
        np.savez(file, base=encoded.base, verifier=encoded.verifier)
    return encoded


def score_pairs(
    model: verifier.Verifier,
    items: Sequence[tuple[str, str, str, int]],
    cache_dir: Path | None = None,
    threshold: float | None = None,
) -> tuple[list[Scored], list[str], verifier.EncodedBatch]:
    """items: (source, cached a, looked-up b, label); one fused pass, then the head."""
    texts = sorted({t for _, a, b, _ in items for t in (a, b)})
    encoded = encode_cached(model, texts, cache_dir)
    row = {t: i for i, t in enumerate(texts)}
    candidates = []
    for _, a, b, _ in items:
        qa, qb = row[b], row[a]  # query = the looked-up b, candidate = the cached a
        candidates.append(
            verifier.CandidatePair(
                query_text=b,
                query_embedding=encoded.base[qa],
                candidate_text=a,
                candidate_embedding=encoded.base[qb],
                cosine=float(np.dot(encoded.base[qa], encoded.base[qb])),
                query_vector=encoded.verifier[qa],
                candidate_vector=encoded.verifier[qb],
            )
        )
    started = time.time()
    scores = model.score_and_compare(candidates, threshold=threshold)[0]
    log(f"scored {len(candidates)} pairs in {time.time() - started:.0f}s")
    # As in the proxy: a question past the encoder's window or without a letter or digit is
    # matched exactly only, and texts that differ where the encoder is blind are refused.
    adapter = verifier.CacheVerifier(model)

    def refused(query: str, candidate: str) -> bool:
        return (
            bool(guards.vetoes(query, candidate))
            or not all(adapter.reads_whole(t) and guards.has_words(t) for t in (query, candidate))
            or adapter.unknown_words(query) != adapter.unknown_words(candidate)
        )

    scored = [
        Scored(
            source=src,
            label=label,
            cosine=c.cosine,
            score=s,
            vetoed=refused(c.query_text, c.candidate_text),
        )
        for (src, _, _, label), c, s in zip(items, candidates, scores, strict=True)
    ]
    return scored, texts, encoded


def precision_recall(labels: np.ndarray, hits: np.ndarray) -> tuple[float, float, int]:
    n_hits = int(hits.sum())
    correct = int((hits & (labels == 1)).sum())
    precision = correct / n_hits if n_hits else float("nan")
    recall = correct / max(int((labels == 1).sum()), 1)
    return precision, recall, n_hits


def curve(
    labels: np.ndarray, values: np.ndarray, allowed: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """PR curve of 'accept when value >= t' over all t, restricted to allowed pairs."""
    order = np.argsort(-values, kind="stable")
    ok = allowed[order]
    positives = (labels[order] == 1) & ok
    tp = np.cumsum(positives)
    hits = np.cumsum(ok)
    keep = ok & (hits > 0)
    precision = tp[keep] / hits[keep]
    recall = tp[keep] / max(int((labels == 1).sum()), 1)
    return recall, precision, values[order][keep]


def recall_at(
    labels: np.ndarray, values: np.ndarray, allowed: np.ndarray, min_precision: float
) -> tuple[float, float]:
    """Best recall with precision >= min_precision, and the value cut-off achieving it."""
    recall, precision, cuts = curve(labels, values, allowed)
    good = precision >= min_precision
    if not good.any():
        return 0.0, float("nan")
    best = int(np.argmax(np.where(good, recall, -1.0)))
    return float(recall[best]), float(cuts[best])


def evaluate(scored: Sequence[Scored], threshold: float, cutoff: float) -> dict[str, object]:
    labels = np.array([s.label for s in scored])
    cos = np.array([s.cosine for s in scored])
    score = np.array([s.score for s in scored])
    vetoed = np.array([s.vetoed for s in scored])
    everything = np.ones_like(vetoed)
    default_hits = (cos >= threshold) & ~vetoed & (score >= cutoff)
    out: dict[str, object] = {
        "pairs": len(scored),
        "positives": int(labels.sum()),
        "default": precision_recall(labels, default_hits),
        "baseline": {t: precision_recall(labels, cos >= t) for t in BASELINE_THRESHOLDS},
        "guards_only_0.80": precision_recall(labels, (cos >= 0.80) & ~vetoed),
    }
    for target in (0.90, 0.95):
        out[f"cosine_recall_at_p{target:.2f}"] = recall_at(labels, cos, everything, target)
        out[f"verifier_recall_at_p{target:.2f}"] = recall_at(
            labels, score, (cos >= threshold) & ~vetoed, target
        )
    out["_arrays"] = (labels, cos, score, vetoed)
    return out


def plot(
    name: str,
    result: dict[str, object],
    threshold: float,
    cutoff: float,
    target: tuple[float, float] | None,
    path: Path,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, cos, score, vetoed = result["_arrays"]  # type: ignore[misc]
    everything = np.ones_like(vetoed)
    fig, ax = plt.subplots(figsize=(6.4, 4.8), dpi=110)
    r, p, _ = curve(labels, cos, everything)
    ax.plot(r, p, label="plain cosine (base MiniLM)", color="tab:gray")
    r, p, _ = curve(labels, cos, ~vetoed)
    ax.plot(r, p, label="cosine + guard vetoes", color="tab:orange", linestyle="--")
    r, p, _ = curve(labels, score, (cos >= threshold) & ~vetoed)
    ax.plot(r, p, label=f"verifier (cos >= {threshold:.2f}, vetoes)", color="tab:blue")
    dp, dr, _ = result["default"]  # type: ignore[misc]
    ax.scatter([dr], [dp], color="tab:blue", zorder=5, label=f"default (cut-off {cutoff:.2f})")
    bp, br, _ = result["baseline"][0.80]  # type: ignore[index]
    ax.scatter(
        [br], [bp], color="tab:gray", marker="x", zorder=5, label="plain cosine 0.80 (GPTCache)"
    )
    if target is not None:
        ax.axhline(target[0], color="tab:red", linewidth=0.8, linestyle=":")
        ax.axvline(target[1], color="tab:red", linewidth=0.8, linestyle=":", label="target")
    ax.set_xlim(0, 1)
    ax.set_ylim(0.3, 1.01)
    ax.set_xlabel("recall (same-question pairs served from cache)")
    ax.set_ylabel("precision (hits that are right)")
    ax.set_title(f"{name}: {result['pairs']} pairs, {result['positives']} same-question")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def fmt(prc: tuple[float, float, int]) -> str:
    p, r, n = prc
    return f"P {p:.3f} / R {r:.3f} ({n} hits)"


def speed(
    model: verifier.Verifier,
    texts: Sequence[str],
    enc: verifier.EncodedBatch,
    entries: int,
    rounds: int,
) -> list[str]:
    """Time the semantic lookup path: fused embedding, usearch search (k=4), guards + head.

    ``texts``/``enc`` are already encoded texts; the first ``entries`` fill the index, queries are
    drawn from the rest and encoded again inside the timed lookup.
    """
    from usearch.index import Index

    rng = np.random.default_rng(0)
    stored = list(texts[:entries])
    index = Index(ndim=verifier.HIDDEN, metric="cos", dtype="f32")
    index.add(np.arange(len(stored)), enc.base[:entries])
    queries = [texts[int(i)] for i in rng.integers(entries, len(texts), size=rounds * 64)]

    crossed = 0

    def lookup(batch: Sequence[str]) -> tuple[float, float, float, float, float]:
        """Seconds for: whole lookup, fused embedding pass, ANN search, guards + head, and the
        cross-encoder (best candidate of each query that passes threshold, guards and gate)."""
        nonlocal crossed
        started = time.perf_counter()
        q = model.encoder.encode(batch)
        embedded = time.perf_counter()
        keys = np.atleast_2d(index.search(q.base, 4).keys)
        searched = time.perf_counter()
        # Every one of the k=4 neighbours is verified, whatever its cosine: an upper bound on the
        # verification cost (at run time only candidates above the threshold are).
        pairs = [
            verifier.CandidatePair(
                query_text=text,
                query_embedding=q.base[row],
                candidate_text=stored[int(key)],
                candidate_embedding=enc.base[int(key)],
                cosine=float(np.dot(q.base[row], enc.base[int(key)])),
                query_vector=q.verifier[row],
                candidate_vector=enc.verifier[int(key)],
            )
            for row, text in enumerate(batch)
            for key in keys[row]
        ]
        scores, comparisons, rows = model.bi_scores(pairs)
        headed = time.perf_counter()
        if model.cross is not None:
            chosen = []
            for row in range(len(batch)):
                # each lookup's own best candidate, as CacheVerifier picks it (cross_top_k 1)
                first, end = row * 4, row * 4 + len(keys[row])
                picked = model.cross_candidates(
                    pairs[first:end], scores[first:end], comparisons[first:end], model.threshold, 1
                )
                chosen += [first + i for i in picked]
            crossed += len(chosen)
            model.cross_scores(pairs, rows, chosen)
        done = time.perf_counter()
        return (
            done - started,
            embedded - started,
            searched - embedded,
            headed - searched,
            done - headed,
        )

    for q in queries[:10]:
        lookup([q])  # warm-up
    crossed = 0
    single = [lookup([q]) for q in queries[: rounds * 4]]
    crossed_single = crossed
    totals = sorted(t[0] * 1000 for t in single)
    p50 = statistics.median(totals)
    p99 = totals[min(len(totals) - 1, int(0.99 * len(totals)))]
    parts = [statistics.median(t[i] * 1000 for t in single) for i in (1, 2, 3)]
    crossed_ms = sorted(t[4] * 1000 for t in single if t[4] > 1e-4)
    cross_p50 = statistics.median(crossed_ms) if crossed_ms else 0.0
    batched = [lookup(queries[i * 64 : (i + 1) * 64]) for i in range(rounds)]
    per_second = 64 * len(batched) / sum(b[0] for b in batched)
    batch_parts = [statistics.median(b[i] * 1000 for b in batched) for i in (1, 2, 3, 4)]
    # Base-only pass for comparison (what the worker pays without the tuned layers).
    base_only = verifier.MiniLMEncoder(model.encoder.tokenizer, model.encoder.weights)
    started = time.perf_counter()
    for i in range(rounds):
        base_only.encode(queries[i * 64 : (i + 1) * 64])
    base_per_second = 64 * rounds / (time.perf_counter() - started)
    load = os.getloadavg()
    return [
        f"- index: {entries} stored questions (usearch, cos, f32), k=4, "
        "every query verifies 4 candidates",
        f"- concurrency 1 (batch of 1): p50 {p50:.1f} ms, p99 {p99:.1f} ms "
        f"over {len(totals)} lookups; median split: embedding {parts[0]:.1f} ms, "
        f"search {parts[1]:.2f} ms, guards + head {parts[2]:.2f} ms",
        "- cross-encoder: "
        + (
            f"ran on {crossed_single}/{len(totals)} single lookups (the others had no candidate "
            f"past threshold, guards and gate), median {cross_p50:.1f} ms when it ran"
            if model.cross is not None
            else "off"
        ),
        f"- concurrency 64 (batch of 64): {per_second:.0f} lookups/s; median split per batch: "
        f"embedding {batch_parts[0]:.0f} ms, search {batch_parts[1]:.1f} ms, "
        f"guards + head {batch_parts[2]:.1f} ms (256 pairs), "
        f"cross-encoder {batch_parts[3]:.0f} ms",
        f"- base-only embedding pass (no tuned layers), batch of 64: {base_per_second:.0f} texts/s",
        f"- load average during the run: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} "
        "(2 cores, shared)",
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--artifacts", type=Path, default=None, help="verifier artifact folder")
    parser.add_argument("--out", type=Path, default=REPO / "out" / "cache_quality")
    parser.add_argument("--qqp-limit", type=int, default=6000, help="qqp pairs of the report part")
    parser.add_argument("--threshold", type=float, default=None, help="override the default")
    parser.add_argument("--cutoff", type=float, default=None, help="override the default")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=REPO / "out" / "verifier_cache",
        help="where encodings are cached between runs",
    )
    parser.add_argument("--speed", action="store_true", help="also time the lookup path")
    parser.add_argument(
        "--cross", action="store_true", help="with the cross-encoder (cache.cross_encoder: true)"
    )
    parser.add_argument(
        "--runtime",
        choices=("reference", "float32", "bfloat16", "int8", "auto"),
        default="reference",
        help="reference: MiniLMEncoder's padded float32 pass; else the proxy's PackedEncoder "
        "with that precision (to check that the faster runtime moves no decision)",
    )
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    model = verifier.Verifier.load(args.artifacts, cross=args.cross)
    if args.runtime != "reference":
        from proxy.cache.packed_encoder import pack_verifier

        packed = pack_verifier(model, precision=args.runtime)
        log(f"runtime: packed, {packed.precision} (the cross-encoder too, when loaded)")
    threshold = args.threshold if args.threshold is not None else model.threshold
    cutoff = args.cutoff if args.cutoff is not None else model.cutoff
    log(f"threshold {threshold:.2f} cut-off {cutoff:.2f} cross-encoder {model.cross is not None}")

    pairs: list[Pair] = part(load_pairs(args.data), "report", args.qqp_limit)
    items = [(p.source, p.a, p.b, p.label) for p in pairs]
    items += [("handwritten", a, b, label) for a, b, label in HANDWRITTEN]
    items += [("handwritten_blind", a, b, label) for a, b, label in HANDWRITTEN_BLIND]
    items += [("handwritten_blind_2", a, b, label) for a, b, label in HANDWRITTEN_BLIND_2]
    items += [("probes", a, b, label) for a, b, label in HANDWRITTEN_PROBES]
    items += [("blind_spots", a, b, label) for a, b, label in HANDWRITTEN_BLIND_SPOTS]
    scored, texts, encoded = score_pairs(model, items, args.cache_dir, threshold)

    lines = [
        "Report part of cache_pairs_dev.csv.gz (never trained or tuned on); "
        f"threshold {threshold:.2f}, verifier cut-off {cutoff:.2f}; "
        f"qqp capped at {args.qqp_limit} report pairs.",
        "",
        "| source | pairs (same) | target | **default: verifier + guards** | plain cos 0.80 "
        "| plain cos 0.90 | plain cos 0.95 "
        "| recall @P0.90 cosine / verifier | recall @P0.95 cosine / verifier |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    summary: dict[str, object] = {"threshold": threshold, "cutoff": cutoff, "sources": {}}
    for source in (*SOURCES, *WRITTEN_SETS):
        subset = [s for s in scored if s.source == source]
        result = evaluate(subset, threshold, cutoff)
        target = TARGETS.get(source)
        plot(source, result, threshold, cutoff, target, args.out / f"pr_{source}.png")
        base: dict[float, tuple[float, float, int]] = result["baseline"]  # type: ignore[assignment]
        c90, v90 = result["cosine_recall_at_p0.90"], result["verifier_recall_at_p0.90"]
        c95, v95 = result["cosine_recall_at_p0.95"], result["verifier_recall_at_p0.95"]
        target_text = f"P>={target[0]:.2f}, R>={target[1]:.2f}" if target else "-"
        lines.append(
            f"| {source} | {result['pairs']} ({result['positives']}) | {target_text} "
            f"| **{fmt(result['default'])}** | {fmt(base[0.80])} | {fmt(base[0.90])} "  # type: ignore[arg-type]
            f"| {fmt(base[0.95])} | {c90[0]:.3f} / {v90[0]:.3f} "  # type: ignore[index]
            f"| {c95[0]:.3f} / {v95[0]:.3f} |"  # type: ignore[index]
        )
        summary["sources"][source] = {  # type: ignore[index]
            k: v for k, v in result.items() if k not in ("_arrays", "baseline")
        } | {"baseline": {str(t): v for t, v in base.items()}}
    for name in WRITTEN_SETS:
        served_wrong, missed = [], []
        for (src, a, b, label), sc in zip(items, scored, strict=True):
            if src != name:
                continue
            hit = sc.cosine >= threshold and not sc.vetoed and sc.score >= cutoff
            if hit and label == 0:
                served_wrong.append(f"{a!r} -> {b!r} (cos {sc.cosine:.2f}, score {sc.score:.2f})")
            if not hit and label == 1:
                missed.append(f"{a!r} -> {b!r}")
        lines += ["", f"{name}: served wrongly at the defaults ({len(served_wrong)}):"]
        lines += [f"- {w}" for w in served_wrong] or ["- none"]
        lines += [f"{name}: paraphrases missed ({len(missed)}):"]
        lines += [f"- {m}" for m in missed] or ["- none"]
    if args.speed:
        lines += [
            "",
            "Speed (same process, torch threads = " + str(args.threads) + "):",
            *speed(model, texts, encoded, 5000, 20),
        ]
    (args.out / "results.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    # Per-pair outputs, to compare two runs decision by decision (e.g. two runtimes).
    np.savez(
        args.out / "scores.npz",
        cosine=np.array([s.cosine for s in scored]),
        score=np.array([s.score for s in scored]),
        vetoed=np.array([s.vetoed for s in scored]),
        label=np.array([s.label for s in scored]),
    )
    (args.out / "results.json").write_text(
        json.dumps(summary, indent=2, default=str) + "\n", encoding="utf-8"
    )
    print("\n".join(lines))
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
