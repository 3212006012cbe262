"""Study storage: Optuna storage URLs, opened with one-line errors, and printed only with the password masked.

A storage URL can hold a database password (postgresql://user:secret@host/db). Every path that prints
or writes a URL (messages, best.json, reports) goes through `mask_url`; nothing else renders one.
"""

from __future__ import annotations

import re
import sqlite3
import time
from pathlib import Path
from typing import Any

import optuna
from optuna.exceptions import StorageInternalError
from optuna.storages import RDBStorage
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, IntegrityError, ProgrammingError, SQLAlchemyError

from placetune.errors import PlacetuneError

CONNECT_TIMEOUT_S = 5  # an unreachable database fails the command instead of hanging it
DEFAULT_STORAGE = "sqlite:///results/placetune.db"
MEMORY_STORAGE = "memory"  # a study kept in this process only (benchmarks), never a URL a user gives
# user:password@ after a scheme, or at the start of a URL typed without one (u:secret@host/db).
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][\w+.-]*://|^)(?P<user>[^:/@\s]*):[^@/\s]*@")
# A password in the query string (postgresql://host/db?password=secret), as libpq and SQLAlchemy take it.
_QUERY_PASSWORD = re.compile(r"(?P<key>[?&](?:password|passwd|pwd|sslpassword)=)[^&#\s]*", re.I)


def mask_url(url: str) -> str:
    """The URL with its password replaced by ***, wherever it is written, also when SQLAlchemy cannot parse it."""
    try:
        masked = make_url(url).render_as_string(hide_password=True)
    except (ArgumentError, ValueError, TypeError):
        masked = url
    masked = _QUERY_PASSWORD.sub(lambda m: f"{m['key']}***", masked)
    return _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:***@", masked)


def mask_in(text: str, url: str) -> str:
    """A message (a driver's error, say) with the URL, and any user:password@ in it, masked."""
    return mask_url(text.replace(url, mask_url(url)))


def first_line(exc: BaseException, url: str) -> str:
    """One line on why a storage would not open, with the password hidden."""
    if isinstance(exc, ImportError):
        return f"no database driver ({exc.__cause__ or exc}); for PostgreSQL: pip install 'placetune[postgres]'"
    text = mask_in(str(exc), url).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def engine_options(url: str) -> dict[str, Any]:
    """SQLAlchemy engine options: PostgreSQL connections are pre-pinged and time out instead of hanging."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "postgresql":
        return {}
    # pre-ping: a connection idle through a long trial may have been dropped by the server or a firewall.
    options: dict[str, Any] = {"pool_pre_ping": True}
    if "connect_timeout" not in parsed.query:
        options["connect_args"] = {"connect_timeout": CONNECT_TIMEOUT_S}
    return options


def open_rdb(url: str, **storage_kwargs: Any) -> RDBStorage:
    """An Optuna RDB storage (heartbeat settings and callbacks in storage_kwargs); errors are one masked line."""
    attempts = 3
    while True:
        try:
            return RDBStorage(url, engine_kwargs=engine_options(url), **storage_kwargs)
        except (IntegrityError, ProgrammingError) as exc:
            # Workers starting together on a fresh database race to create its tables; the loser finds them made.
            attempts -= 1
            if not attempts:
                raise PlacetuneError(f"cannot open storage {mask_url(url)}: {first_line(exc, url)}") from None
            time.sleep(0.5)
        except (ValueError, ImportError, StorageInternalError, SQLAlchemyError) as exc:
            raise PlacetuneError(f"cannot open storage {mask_url(url)}: {first_line(exc, url)}") from None


def sqlite_file(url: str) -> Path | None:
    """The file of an sqlite:/// URL, None for other databases."""
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        return None
    if not parsed.drivername.startswith("sqlite") or not parsed.database or parsed.database == ":memory:":
        return None
    return Path(parsed.database)


def load_existing_study(url: str, name: str | None = None) -> optuna.Study:
    """A study that must already exist: never creates tables in a missing or foreign file.

    With no name, the storage must hold exactly one study. Every error is one line with the URL masked.
    """
    try:
        make_url(url)
    except (ArgumentError, ValueError):
        raise PlacetuneError(f"storage {mask_url(url)!r} is not a database URL such as {DEFAULT_STORAGE}") from None
    path = sqlite_file(url)
    if path is not None:
        if not path.is_file():
            raise PlacetuneError(f"study storage {path} not found; pass --storage URL or a results folder")
        try:
            with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as con:
                has_studies = con.execute("SELECT 1 FROM sqlite_master WHERE name = 'studies'").fetchone()
        except sqlite3.DatabaseError as exc:
            raise PlacetuneError(f"{path} is not an SQLite file ({exc})") from None
        if not has_studies:
            raise PlacetuneError(f"{path} holds no Optuna study (a regress history goes to --history)")
    storage = open_rdb(url)
    try:
        names = [s.study_name for s in storage.get_all_studies()]
    except (SQLAlchemyError, StorageInternalError) as exc:
        raise PlacetuneError(f"cannot read studies in {mask_url(url)}: {first_line(exc, url)}") from None
    if name is None:
        if len(names) != 1:
            raise PlacetuneError(f"{mask_url(url)} holds {len(names)} studies; name one of: "
                                 f"{', '.join(names) or '(none)'}")
        name = names[0]
    elif name not in names:
        raise PlacetuneError(f"no study {name!r} in {mask_url(url)} (studies there: {', '.join(names) or 'none'})")
    return optuna.load_study(study_name=name, storage=storage)
