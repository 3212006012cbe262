"""The one exception type the CLI turns into a one-line message and a non-zero exit."""


class PlacetuneError(Exception):
    """A problem the user can fix: the message says what is wrong and how to fix it."""

    exit_code: int = 2

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code
