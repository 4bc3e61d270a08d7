"""Chat prompts from the ``dataset.prompt`` config: ``{system: str | null, user: str}`` templates.

Templates name doc fields in braces (``{question}``); only the names passed in are replaced, so other braces in a
template (``\\boxed{Your answer}``) and in the substituted text (LaTeX) are left alone.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from qalign_repro.errors import ConfigError

Messages = list[dict[str, str]]


def render(template: str, fields: Mapping[str, Any]) -> str:
    names = "|".join(re.escape(k) for k in fields)
    if not names:
        return template
    return re.sub(r"\{(" + names + r")\}", lambda m: str(fields[m.group(1)]), template)


def chat_prompt(prompt_cfg: Any, fields: Mapping[str, Any], task: str) -> Messages:
    """``[{"role": "system", ...}?, {"role": "user", ...}]`` from the task's prompt config."""
    if isinstance(prompt_cfg, str):
        prompt_cfg = {"user": prompt_cfg}
    if not isinstance(prompt_cfg, Mapping) or not prompt_cfg.get("user"):
        raise ConfigError(f"dataset.prompt for {task!r} must have a 'user' template; got {prompt_cfg!r}")
    user = str(prompt_cfg["user"])
    if not any("{" + k + "}" in user for k in fields):
        raise ConfigError(
            f"dataset.prompt.user for {task!r} does not contain a field placeholder; allowed: {', '.join('{' + k + '}' for k in fields)}"
        )
    messages: Messages = []
    if prompt_cfg.get("system"):
        messages.append({"role": "system", "content": render(str(prompt_cfg["system"]), fields)})
    messages.append({"role": "user", "content": render(user, fields)})
    return messages
