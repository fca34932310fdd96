"""Errors the CLI reports as one line: bad input (exit 2) and a diverged training (exit 1)."""


class UsageError(Exception):
    """Bad input from the user (config, flag, path, URL): reported as one line, exit code 2."""


class TrainingDiverged(RuntimeError):
    """Loss or gradients became NaN or infinite; the run ends FAILED with this message."""
