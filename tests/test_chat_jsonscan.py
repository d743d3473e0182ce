"""The JSON prefix scanner that streamed tool-call arguments rely on, checked against ``json``.

Random short texts over JSON's own characters: the scanner must accept a text character by
character and call it whole exactly when ``json.loads`` (strict) parses it; and every prefix of
real JSON must be accepted as it grows.
"""

from __future__ import annotations

import json
import random

from vramsupply.chat.jsonscan import JsonScanner

ALPHABET = '{}[]:,"\\ 0123456789-.eE+trufalsn\n\x01u'


def scans_whole(text: str) -> bool:
    scanner = JsonScanner()
    return all(scanner.feed(char) for char in text) and scanner.finishes()


def parses(text: str) -> bool:
    try:
        json.loads(text, strict=True)
    except ValueError:
        return False
    return True


def test_the_scanner_agrees_with_json_on_random_texts() -> None:
    rng = random.Random(5)
    for _ in range(50_000):
        text = "".join(rng.choice(ALPHABET) for _ in range(rng.randint(1, 9))).rstrip()
        assert scans_whole(text) == parses(text), repr(text)


def random_value(rng: random.Random, depth: int = 0) -> object:
    roll = rng.random()
    if depth > 3 or roll < 0.3:
        return rng.choice([0, -1.5, 12e3, "a\nb \"q\" \\", "é ☃", True, None, False, 123456789])
    if roll < 0.6:
        return [random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    return {f"k{i}": random_value(rng, depth + 1) for i in range(rng.randint(0, 3))}


def test_every_prefix_of_real_json_is_accepted_and_the_end_is_known() -> None:
    rng = random.Random(8)
    for _ in range(2000):
        text = json.dumps(random_value(rng), indent=rng.choice([None, 1]), ensure_ascii=rng.random() < 0.5)
        scanner = JsonScanner()
        for index, char in enumerate(text):
            assert scanner.feed(char), (text, index)
            assert scanner.done == (index == len(text) - 1 and text[-1] in "}]\"el"), (text, index)
        assert scanner.finishes()
