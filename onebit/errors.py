"""Exception types the CLI turns into one sentence and a non-zero exit status (``run_cli``).

* :class:`OneBitInputError` — bad input from the user (config value, path, model id, data set,
  checkpoint): exit status 2.
* :class:`OneBitRunError` — a fault during a run (non-finite loss or gradients, disk full while
  saving, an unreadable checkpoint): exit status 3.
* :class:`Preempted` — the run was asked to stop (SIGTERM, SIGUSR1) and saved a checkpoint to resume
  from: exit status 128 + the signal number, as for a process the signal had ended.
"""

from __future__ import annotations

EXIT_INPUT = 2
EXIT_RUN = 3


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (its type's name when the message is empty), for
    one-sentence errors that quote a library's reason."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


class OneBitInputError(ValueError):
    """Bad input from the user (config value, path, model id, data set): one clear sentence."""


class OneBitRunError(RuntimeError):
    """A fault during a run that stops it (the message names what, where and what to do)."""


class Preempted(Exception):
    """The run stopped on a signal after saving ``checkpoint``; ``exit_code`` is 128 + signal."""

    def __init__(self, message: str, signum: int, checkpoint: str | None = None) -> None:
        super().__init__(message)
        self.signum, self.checkpoint = signum, checkpoint

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def run_cli(fn, *args) -> None:
    """Call ``fn(*args)``; on bad input, a run fault or pre-emption print one sentence and exit."""
    import sys

    try:
        fn(*args)
    except OneBitInputError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(EXIT_INPUT)
    except OneBitRunError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(EXIT_RUN)
    except Preempted as e:
        print(f"stopped: {e}", file=sys.stderr, flush=True)
        sys.exit(e.exit_code)
