"""One module per task; TASKS is the one place a task name becomes code.

A new task is a module here that meets `peftlab.task.TaskModule`, and one line below.
"""

from __future__ import annotations

from peftlab.errors import PeftlabError
from peftlab.task import TaskModule
from peftlab.tasks import (
    causal_lm,
    classification,
    image_classification,
    question_answering,
    token_classification,
)

TASKS: dict[str, TaskModule] = {
    "classification": classification,
    "causal_lm": causal_lm,
    "token_classification": token_classification,
    "question_answering": question_answering,
    "image_classification": image_classification,
}


def task_module(name: str) -> TaskModule:
    """The module of a recipe's model.task or a run's peftlab.json task."""
    try:
        return TASKS[name]
    except KeyError:
        raise PeftlabError(f"task '{name}' is unknown (known: {', '.join(TASKS)})") from None


def task_of_run(info: dict) -> TaskModule:
    """A finished run's task; runs from before tasks were recorded are classifiers."""
    return task_module(info.get("task", "classification"))
