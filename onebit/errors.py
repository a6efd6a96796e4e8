"""The exception type for bad user input: the CLI prints its message alone and exits non-zero."""


class OneBitInputError(ValueError):
    """Bad input from the user (config value, path, model id, data set): one clear sentence."""
