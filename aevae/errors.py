"""Errors the CLI reports as one line: bad input (exit 2), a diverged training or a failed command (exit 1)."""


class UsageError(Exception):
    """Bad input from the user (config, flag, path, URL): reported as one line, exit code 2."""


class TrainingDiverged(RuntimeError):
    """Loss or gradients became NaN or infinite; the run ends FAILED with this message."""


class CommandFailed(RuntimeError):
    """The command ran but failed as a whole (every trial of a sweep failed): one line, exit code 1."""
