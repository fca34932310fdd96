"""Errors the CLI reports as one line: bad input (exit 2), a diverged training or a failed command (exit 1)."""


class UsageError(Exception):
    """Bad input from the user (config, flag, path, URL): reported as one line, exit code 2."""


class TrainingDiverged(RuntimeError):
    """Loss or gradients became NaN or infinite; the run ends FAILED with this message."""


class CommandFailed(RuntimeError):
    """The command ran but failed as a whole (every trial of a sweep failed): one line, exit code 1."""


def causes(err: BaseException) -> list[BaseException]:
    """The error and what it was raised from or during, outermost first."""
    chain: list[BaseException] = []
    cause: BaseException | None = err
    while cause is not None and cause not in chain:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    return chain
