"""Error types for bad user input; `library.cli.run_cli` turns them into one line and exit code 2."""
from __future__ import annotations


class UserInputError(Exception):
    """Bad input from the user: a file, a flag or a config value. The message is shown as is."""


class ModelFormatError(UserInputError):
    """A model file or folder that is not what was expected (not a checkpoint, truncated, unknown layout)."""

    def __init__(self, path: object, message: str):
        self.path = str(path)
        super().__init__(f"{self.path}: {message}")


class ConfigError(UserInputError):
    """A config value that is wrong: names the file, the key path, what was expected and what was found."""

    def __init__(self, file: object, key: str, expected: str, got: object = None, hint: str | None = None):
        self.file, self.key, self.expected, self.got = str(file), key, expected, got
        message = f"{self.file}: {key}: expected {expected}"
        if got is not None:
            message += f", got {got!r}"
        if hint:
            message += f"; {hint}"
        super().__init__(message)


class FlagError(UserInputError):
    """A command-line flag (or flag combination) that cannot work."""


class TrainingStopped(UserInputError):
    """Training cannot go on (a NaN/inf loss, for example); the message says why and what was kept."""
