"""The one exception type the CLI turns into a one-line message and a non-zero exit, and the reader of
files the user names, which turns every way such a file can be wrong into it."""

from pathlib import Path


class PlacetuneError(Exception):
    """A problem the user can fix: the message says what is wrong and how to fix it."""

    exit_code: int = 2

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def read_user_text(path: Path, what: str) -> str:
    """A file the user named, as text: a folder, a binary or an unreadable file is one line saying what to give."""
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PlacetuneError(f"{path} not found; give {what}") from None
    except UnicodeDecodeError:
        raise PlacetuneError(f"{path} is not a text file; give {what}") from None
    except OSError as exc:
        raise PlacetuneError(f"{path}: cannot read it ({exc.strerror or exc}); give {what}") from None
