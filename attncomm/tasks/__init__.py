"""The tasks: prompts with role positions and answers, task directions, metrics and correctness checks.

Built in: ioi, gt, gp, induction; from a prompt file: file (``task.path``) and the seed tasks
syllogism and sequence, whose files ship with the package.

``get_task(name)`` returns a :class:`Task`; ``TASK_NAMES`` lists the registered names.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from attncomm.tasks.base import Task, TaskPrompts, TaskTokenizerError, UnknownTaskError
from attncomm.tasks.gp import GenderedPronounTask
from attncomm.tasks.gt import GreaterThanTask
from attncomm.tasks.induction import InductionTask
from attncomm.tasks.ioi import IOITask
from attncomm.tasks.prompt_file import FilePromptTask, SequenceTask, SyllogismTask

_TASKS: dict[str, type[Task]] = {
    "ioi": IOITask,
    "gt": GreaterThanTask,
    "gp": GenderedPronounTask,
    "induction": InductionTask,
    "file": FilePromptTask,
    "syllogism": SyllogismTask,
    "sequence": SequenceTask,
}

#: the tasks that read their prompts from a file (``task.path``, ``task.strict_answers``)
FILE_TASKS: tuple[str, ...] = ("file", "syllogism", "sequence")

#: the registered task names, as used by ``task.name`` in the configs
TASK_NAMES: tuple[str, ...] = tuple(_TASKS)


def get_task(name: str, **kwargs: Any) -> Task:
    """The task registered as ``name`` (``kwargs`` go to its constructor, e.g. induction's ``seq_len``)."""
    if name not in _TASKS:
        raise UnknownTaskError(
            f"unknown task {name!r}; valid task names: {', '.join(TASK_NAMES)} (set task.name=...)"
        )
    return _TASKS[name](**kwargs)


def task_kwargs(task_cfg: Any) -> dict[str, Any]:
    """Constructor arguments of the task a ``TaskConfig`` selects: its ``options``, plus the file of a
    file task (``task.path``, default: the packaged file of a seed task) and ``task.strict_answers``."""
    kwargs = dict(getattr(task_cfg, "options", {}) or {})
    if task_cfg.name in FILE_TASKS:
        kwargs.setdefault("strict_answers", bool(getattr(task_cfg, "strict_answers", False)))
        path = getattr(task_cfg, "path", None)
        if path or task_cfg.name == "file":
            kwargs.setdefault("path", path)
    return kwargs


def task_run_name(task_cfg: Any) -> str:
    """The task's name in run directories and artifact names: ``file-{stem}`` for ``task=file`` (so two
    files never share a run directory), else the task name."""
    if task_cfg.name == "file" and getattr(task_cfg, "path", None):
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(str(task_cfg.path)).stem) or "prompts"
        return f"file-{stem}"
    return str(task_cfg.name)


__all__ = [
    "FILE_TASKS",
    "TASK_NAMES",
    "FilePromptTask",
    "SequenceTask",
    "SyllogismTask",
    "task_kwargs",
    "task_run_name",
    "GenderedPronounTask",
    "GreaterThanTask",
    "IOITask",
    "InductionTask",
    "Task",
    "TaskPrompts",
    "TaskTokenizerError",
    "UnknownTaskError",
    "get_task",
]
