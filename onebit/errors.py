"""The exception type for bad user input: the CLI prints its message alone and exits non-zero."""


class OneBitInputError(ValueError):
    """Bad input from the user (config value, path, model id, data set): one clear sentence."""


def run_cli(fn, *args) -> None:
    """Call ``fn(*args)``; on bad input print its one sentence and exit with status 2."""
    import sys

    try:
        fn(*args)
    except OneBitInputError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
