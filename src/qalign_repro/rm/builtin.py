"""Built-in Python rewards for ``reward=python`` and mixes (``reward=mix``); each costs 0 model FLOPs.

- ``length_penalty``: ``-len(text)`` in characters. With a small positive weight in a mix it shifts the target
  towards shorter completions; characters, not tokens, so the value does not depend on a tokenizer.
- ``verifier``: a factory (``args: {dataset: <conf/dataset name or mapping>}``) returning 1.0 when the task's
  own grader says the extracted answer is correct, else 0.0. It finds the gold answer by the prompt's messages,
  which the run stores for every chain, among every doc of the configured split: a reward sees only
  (messages, text), and this keeps that contract instead of widening it for one reward. Using the gold answer
  makes it an oracle: an upper bound to compare RMs against, not a deployable reward.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

from qalign_repro.errors import ConfigError, DataError

Messages = list[dict[str, str]]


def length_penalty(messages: Messages, text: str) -> float:
    """Minus the completion's length in characters."""
    return -float(len(text))


def _key(messages: Messages) -> str:
    return json.dumps([[m["role"], m["content"]] for m in messages])


def verifier(dataset: str | Mapping[str, Any] = "arith") -> Callable[[Messages, str], float]:
    """1.0 if ``text`` grades correct for the doc whose prompt is ``messages``, else 0.0 (see the module doc)."""
    from qalign_repro.tasks import get_task

    if isinstance(dataset, str):
        from qalign_repro.api import load_task

        task = load_task(dataset)
    elif isinstance(dataset, Mapping):
        task = get_task(dict(dataset))
    else:
        raise ConfigError(f"reward.args.dataset={dataset!r} is invalid; allowed: a conf/dataset name or a "
                          "dataset config mapping")
    docs = {_key(task.prompt(d)): d for d in task.load_all()}

    def verify(messages: Messages, text: str) -> float:
        doc = docs.get(_key(messages))
        if doc is None:
            raise DataError(f"reward verifier({task.name}): the prompt {messages[-1]['content'][:60]!r} is not a "
                            f"doc of {task.name}; allowed: prompts of the dataset named in reward.args.dataset")
        return 1.0 if task.grade(doc, text)["correct"] else 0.0

    verify.__name__ = f"verifier_{task.name}"
    return verify
