"""The one exception type for mistakes a user can make.

The CLI prints it as a single line and exits 2; anything else is our bug and keeps its
traceback.
"""


class PeftlabError(Exception):
    """Bad input: a recipe key, a data file or column, a model path, a run folder."""


class RunInterrupted(Exception):
    """Ctrl-C or SIGTERM arrived; the run saved a checkpoint (when it keeps any) and stopped.
    The CLI exits 130, the shell's code for an interrupt."""
