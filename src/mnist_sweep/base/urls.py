"""Store URLs: building them with a password, and masking that password wherever we show or
record one (messages, progress lines, MLflow params and tags, artifacts).

Shared by the Optuna storage (study.py), the MLflow tracking store (tracking.py), the local
servers (servers.py) and the sweep file's checks, which all handle URLs that may carry one.
"""

from __future__ import annotations

import re
import urllib.parse
from pathlib import Path

MASK = "***"
# Query-string keys that carry a secret (libpq and SQLAlchemy accept password=...).
SECRET_QUERY_KEYS = ("password", "passwd", "pwd", "secret", "token", "access_token")
# user:password@ in any text: a URL in a YAML file, a log line, an error message. The password
# part is greedy (up to the token's last '@'), so an unencoded '@' or '/' in it is masked too.
_USERINFO = re.compile(
    r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<user>[^\s:/@'\"]*):(?P<password>[^\s'\"]*)@"
)
_QUERY_SECRET = re.compile(
    r"(?P<key>[?&;](?:" + "|".join(SECRET_QUERY_KEYS) + r")=)(?P<value>[^&#\s'\"]*)", re.IGNORECASE
)


def with_password(
    scheme: str, user: str, password: str, host: str, port: int, path: str = ""
) -> str:
    """scheme://user:password@host:port/path with user and password percent-encoded, so that a
    password holding '/', '@', ':' or '#' neither breaks the URL nor escapes the masking."""
    user, password = urllib.parse.quote(user, safe=""), urllib.parse.quote(password, safe="")
    host = f"[{host}]" if ":" in host else host
    return f"{scheme}://{user}:{password}@{host}:{port}/{path.lstrip('/')}"


def redact_uri(uri: str) -> str:
    """The URI with its password (user:password@ and any ?password=...) replaced by ***."""
    return mask_secrets(uri)


def mask_secrets(text: str) -> str:
    """Any text with the password of every URL in it, and every secret query value, masked."""
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:{MASK}@", text)
    return _QUERY_SECRET.sub(lambda m: f"{m['key']}{MASK}", text)


def password_of(uri: str) -> list[str]:
    """The URI's password(s) as written and decoded: what must never appear in output."""
    found = []
    for match in list(_USERINFO.finditer(uri)) + list(_QUERY_SECRET.finditer(uri)):
        raw = match.groupdict().get("password") or match.groupdict().get("value") or ""
        if raw:
            found += [raw, urllib.parse.unquote(raw)]
    return sorted(set(found), key=len, reverse=True)


def redact_reason(text: str, url: str) -> str:
    """An error text (a driver's, say) with the URL's password masked, in every form a driver
    may print it (as written in the URL or percent-decoded)."""
    for secret in password_of(url):
        text = text.replace(secret, MASK)
    return mask_secrets(text)


def redact_passwords(value):
    """A config (dicts, lists, strings) with the password of every URL in it masked: what is
    recorded as params and config.yaml (a tracking URI may carry one)."""
    if isinstance(value, dict):
        return {k: redact_passwords(v) for k, v in value.items()}
    if isinstance(value, list):
        return [redact_passwords(v) for v in value]
    if isinstance(value, str) and ("://" in value or "=" in value):
        return mask_secrets(value)
    return value


def scheme_of(uri: str) -> str:
    """'postgresql' for postgresql+psycopg://..., '' when there is none."""
    return urllib.parse.urlsplit(uri).scheme.split("+")[0]


def not_sqlite(path: Path) -> bool:
    """`path` exists and is not a SQLite database. An empty file counts as one: SQLite creates
    the file first and writes its header with the first commit, so another process opening
    the same new database at that moment sees 0 bytes.

    Asked through SQLite itself, never by opening the file: closing any descriptor of a database
    file drops every POSIX lock this process holds on it, SQLite's among them; another process
    then took this one's WAL for unused, checkpointed and deleted it, and the writes of this
    process went on into the deleted file, seen by nobody (a sweep's report read a study stuck
    at its first trials). SQLite's own connections share their locks and close safely."""
    import sqlite3

    if not path.exists():
        return False
    try:
        with sqlite3.connect(
            f"file:{urllib.parse.quote(str(path.resolve()))}?mode=ro", uri=True
        ) as db:
            db.execute("PRAGMA schema_version").fetchone()
        db.close()
    except sqlite3.DatabaseError as error:  # "file is not a database"
        return "not a database" in str(error)
    return False
