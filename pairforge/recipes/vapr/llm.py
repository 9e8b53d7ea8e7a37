"""VaPR's LLM editor: one prompt template per task (``prompts/vapr/<task>.txt``, in the package),
a retry note (``prompts/vapr/retry.txt``), filling them, and reading the edited answer out of
the model's reply. Pure string work; the model call is the recipe's (models protocol).

Template fields: ``{question}``, ``{answer}``, ``{context}`` (the textual description of the
image, §3.4; :mod:`pairforge.recipes.vapr.describe`), ``{avoid}`` (the task's penalty list, or
"none") and ``{feedback}`` (empty, or the filled retry note with ``{previous}`` and
``{reason}``). Other braces are left as they are.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence

from pairforge.resources import read_prompt

RETRY = "vapr/retry.txt"


def template_name(task: str) -> str:
    return f"vapr/{task}.txt"


def load_templates(tasks: Iterable[str]) -> dict[str, str]:
    """Every template the LLM editor may use for ``tasks``, by name (``vapr/<task>.txt``)."""
    names = [template_name(t) for t in tasks] + [RETRY]
    return {n: read_prompt(*n.split("/")) for n in names}


def fill(template: str, **fields: str) -> str:
    """``template`` with its ``{field}`` s replaced (unknown fields are left untouched)."""
    return re.sub(r"\{(\w+)\}", lambda m: fields.get(m.group(1), m.group(0)), template)


def editor_prompt(templates: dict[str, str], task: str, question: str, answer: str,
                  penalty: Sequence[str], previous: str | None = None, reason: str | None = None,
                  context: str = "") -> str:
    """The editor prompt for one answer (``context``: the image's description); with
    ``previous`` / ``reason`` it carries the retry note."""
    feedback = ""
    if previous is not None:
        note = fill(templates[RETRY], previous=previous.replace("\n", " "), reason=reason or "")
        feedback = "\n" + note.strip() + "\n"
    from pairforge.recipes.vapr.describe import NONE

    return fill(templates[template_name(task)], question=question.strip(), answer=answer.strip(),
                avoid=", ".join(penalty) or "none", feedback=feedback,
                context=" ".join(context.split()) or NONE)


_PREFIX = re.compile(r"^\s*(?:wrong answer|edited answer|new answer|answer|edited|rejected)\s*:\s*",
                     re.IGNORECASE)


def parse_edit(reply: str) -> str:
    """The edited answer in a model reply: its first non-empty line, without a leading
    "Wrong answer:" (or similar) label and without surrounding quotes."""
    line = next((ln for ln in reply.splitlines() if ln.strip()), "")
    line = _PREFIX.sub("", line).strip()
    if len(line) >= 2 and line[0] == line[-1] and line[0] in "\"'`":
        line = line[1:-1].strip()
    return line


def token_budget(answer: str, cap: int) -> int:
    """New tokens allowed for the edit of ``answer``: about two per word plus slack, rounded up
    to a multiple of 16 (so requests bucket into few batches) and at most ``cap``. It depends on
    the answer alone, so an edit never depends on what else is in the batch."""
    return min(cap, 16 * math.ceil((2 * len(answer.split()) + 8) / 16))
