"""What ``Sampler.run`` returns: the outputs of every prompt with what a user asks of them next.

Why an object and not the stored records alone: the first questions after a run are "what did each prompt end
with, was it right, how often did the chain move", and answering them from lists of dicts meant re-implementing
the task's grader and the MCMC diagnostics by hand. The records stay untouched underneath (``result[i]`` is
prompt i's list of outputs, in the stored schema, and a result equals the list of those lists), so code written
for the old return value keeps working.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import pandas as pd

from qalign_repro.analysis.diagnostics import chain_diagnostics

#: output fields copied into ``to_pandas`` rows (when present), in this order
OUTPUT_COLUMNS = ("text", "reward", "accepted", "index", "proposal_len", "proposal_reward", "tokens_generated",
                  "tokens_prefilled", "finish_reason")


@dataclass
class PromptResult:
    """One prompt: its outputs (QAlign: chain states 0..k; other methods: independent samples) and, when the run
    had a task, each output's grade (``answer``; ``correct`` only when the prompt was a task doc with a gold
    answer)."""

    prompt_id: str
    messages: list[dict[str, str]]
    outputs: list[dict[str, Any]]
    grades: list[dict[str, Any]] | None = None
    doc: dict[str, Any] | None = None
    gold: str | None = None
    chain: bool = True  # False for independent samples, which have no acceptance

    @property
    def final(self) -> dict[str, Any]:
        """The last output: a chain's current state, or the last independent sample."""
        return self.outputs[-1]

    @property
    def answers(self) -> list[str | None] | None:
        return None if self.grades is None else [g.get("answer") for g in self.grades]

    @property
    def correct(self) -> list[bool | None] | None:
        return None if self.grades is None else [g.get("correct") for g in self.grades]

    @property
    def acceptance(self) -> float | None:
        """Share of accepted proposals after the initial state (None for samples or fewer than two outputs)."""
        if not self.chain:
            return None
        moves = [bool(o["accepted"]) for o in self.outputs[1:]]
        return sum(moves) / len(moves) if moves else None


@dataclass(eq=False, repr=False)
class Result(Sequence):
    """Per-prompt results of one ``Sampler.run``. ``result[i]`` / iteration / ``len`` behave like the list of
    per-prompt output lists the API used to return; ``result.prompts[i]`` is the ``PromptResult``."""

    method: str
    kind: str  # "chain" (QAlign: output k is the state after step k) or "samples" (independent outputs)
    beta: float
    prompts: list[PromptResult]
    task: str | None = None
    store: Any = None
    diagnostics: dict[str, Any] | None = field(default=None)

    def __post_init__(self) -> None:
        if self.kind == "chain" and self.diagnostics is None:
            self.diagnostics = chain_diagnostics(p.outputs for p in self.prompts)

    # -- list-like access (the old return value) -------------------------------------------------------------
    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [p.outputs for p in self.prompts[i]]
        return self.prompts[i].outputs

    def __len__(self) -> int:
        return len(self.prompts)

    def __iter__(self) -> Iterator[list[dict[str, Any]]]:
        return (p.outputs for p in self.prompts)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Result):
            return self.records == other.records
        if isinstance(other, Sequence) and not isinstance(other, (str, bytes)):
            return self.records == [list(x) for x in other]
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # mutable, like the lists it stands for

    @property
    def records(self) -> list[list[dict[str, Any]]]:
        return [p.outputs for p in self.prompts]

    # -- summaries -------------------------------------------------------------------------------------------
    @property
    def final(self) -> list[dict[str, Any]]:
        return [p.final for p in self.prompts]

    @property
    def acceptance(self) -> float | None:
        """Chains: share of accepted proposals over all chains (None for independent samples)."""
        return None if not self.diagnostics else self.diagnostics.get("acceptance_overall")

    @property
    def acceptance_changed(self) -> float | None:
        """Chains: acceptance of the proposals that differ from the current completion (what β controls)."""
        return None if not self.diagnostics else self.diagnostics.get("acceptance_changed_overall")

    def accuracy(self) -> float | None:
        """Mean correctness of the final outputs over the prompts that have a gold answer (None without)."""
        finals = [p.correct[-1] for p in self.prompts if p.correct is not None and p.correct[-1] is not None]
        return sum(map(bool, finals)) / len(finals) if finals else None

    def to_pandas(self) -> pd.DataFrame:
        """One row per output: prompt, step, the output's fields, and ``answer`` / ``correct`` with a task."""
        rows = []
        for p in self.prompts:
            for step, out in enumerate(p.outputs):
                row: dict[str, Any] = {"prompt_id": p.prompt_id, "step": step}
                row.update({k: out[k] for k in OUTPUT_COLUMNS if k in out})
                row["n_tokens"] = len(out.get("completion_ids", ()))
                if p.grades is not None:
                    row["answer"] = p.grades[step].get("answer")
                    row["correct"] = p.grades[step].get("correct")
                    row["gold"] = p.gold
                rows.append(row)
        return pd.DataFrame(rows)

    def __repr__(self) -> str:
        steps = min((len(p.outputs) for p in self.prompts), default=0)
        what = "chain states" if self.kind == "chain" else "samples"
        head = f"{self.method} (beta={self.beta:g}): {len(self.prompts)} prompts x {steps} {what}"
        if self.acceptance is not None:
            head += f"; acceptance {self.acceptance:.2f}"
            if self.acceptance_changed is not None:
                head += f" ({self.acceptance_changed:.2f} of the changed proposals)"
        acc = self.accuracy()
        if acc is not None:
            head += f"; final outputs correct {acc:.2f}"
        lines = [head]
        for p in self.prompts[:8]:
            text = p.final["text"].replace("\n", " ")
            line = f"  {p.prompt_id}: {text[:70]!r}"
            if p.answers is not None:
                line += f" -> {p.answers[-1]}"
                if p.gold is not None:
                    correct = cast("list[bool | None]", p.correct)  # grades are set: answers is not None
                    line += f" (gold {p.gold}, {'right' if correct[-1] else 'wrong'})"
            lines.append(line)
        if len(self.prompts) > 8:
            lines.append(f"  ... {len(self.prompts) - 8} more")
        return "\n".join(lines)


def grade_outputs(task: Any, doc: Mapping[str, Any] | None, outputs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The task's grade of every output: ``task.grade`` with a doc (answer, correct, extra metrics), else only
    ``task.extract``'s answer (a free-text prompt has no gold)."""
    if doc is not None:
        return [dict(task.grade(dict(doc), o["text"])) for o in outputs]
    return [{"answer": task.extract(o["text"]), "correct": None} for o in outputs]
