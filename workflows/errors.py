"""The one error type the CLI turns into a single clear line and exit code 2."""


class UserError(Exception):
    """Bad input from the user: the message names the problem and how to fix it."""


def check(condition: bool, message: str) -> None:
    """Raise :class:`UserError` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise UserError(message)
