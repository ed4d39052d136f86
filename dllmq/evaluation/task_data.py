"""The bundled tasks' data and scoring helpers (no lm-eval, no model): where the files are, how to read them, how
an answer is extracted. Both tasks.py (the runner) and harness.py (the lm-eval task definitions) use them."""

from __future__ import annotations

import json
import re

from ..errors import UserError
from ..models.loading import BUNDLED_DIR

TASK_DIR = BUNDLED_DIR / "tasks"


def load_task(name: str, limit: int | None = None) -> list[dict]:
    f = TASK_DIR / f"{name}.jsonl"
    if not f.exists():
        raise UserError(f"task data {f} is missing from this install; reinstall dllmq")
    rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    return rows[:limit] if limit else rows


_ANSWER = re.compile(r"####\s*(-?[\d,]+)")


def extract_answer(text: str) -> int | None:
    m = _ANSWER.search(text)
    if m:
        try:
            return int(m.group(1).replace(",", ""))
        except ValueError:
            return None
    return None


def code_completion(prompt: str, generated: str) -> str:
    """The model answers with the whole function (as trained); accept a bare body too."""
    if re.search(r"^\s*def\s", generated, re.M):
        return generated
    return prompt + generated
