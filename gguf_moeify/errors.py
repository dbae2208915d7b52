"""The one exception type that the CLI turns into a single clear line (no traceback)."""


class UserError(Exception):
    """Bad input or a missing prerequisite: the message says what is wrong and what to do."""
