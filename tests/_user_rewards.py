"""User-written rewards for tests/test_rewards_user.py (importable as ``_user_rewards``: tests/ is on the path)."""

from __future__ import annotations

NOT_CALLABLE = 3.0


def by_len(messages, text):
    return 0.25 * len(text)


def by_len_batched(messages, texts):
    return [0.25 * len(t) for t in texts]


def count_b(messages, text):
    return text.count("b")


def nan_reward(messages, text):
    return float("nan")


def word_reward(messages, text):
    return "high"


def short_batch(messages, texts):
    return [1.0]
