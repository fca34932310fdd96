"""The one error type that the CLI turns into a single line and exit code 2."""


class UsageError(Exception):
    """Bad input from the user (config, flag, path, URL): reported as one line, exit code 2."""
