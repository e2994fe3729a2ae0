"""What a request record may show of captured data. By default secrets are replaced by ``<redacted>``:
credentials and cookies in headers, the values of query parameters, literals in SQL and the arguments
of Redis commands (keys stay: they name the data, the values are the data); bodies are shown only with
``--no-redact``. Everything that names an endpoint stays (methods, paths, parameter names, statuses,
SQL statement shapes, DNS names and answers).
"""

from __future__ import annotations

import re

REDACTED = "<redacted>"
SECRET_HEADERS = frozenset(
    {
        "authorization",
        "proxy-authorization",
        "cookie",
        "set-cookie",
        "x-api-key",
        "x-auth-token",
        "x-csrf-token",
    }
)

# SQL literals: quoted strings (with '' escapes), dollar-quoted strings, numbers not part of a name.
_SQL_LITERAL = re.compile(
    r"""'(?:[^']|'')*'|\$(\w*)\$.*?\$\1\$|(?<![\w$.])-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?(?![\w$])""",
    re.DOTALL,
)
_SPACES = re.compile(r"\s+")


def headers(values: dict[str, str]) -> dict[str, str]:
    return {name: REDACTED if name in SECRET_HEADERS else value for name, value in values.items()}


def path(target: str) -> str:
    """/search?q=secret&page=2 -> /search?q=<redacted>&page=<redacted>"""
    base, sep, query = target.partition("?")
    if not sep:
        return target
    params = [p.partition("=") for p in query.split("&")]
    return base + "?" + "&".join(f"{name}={REDACTED}" if eq else name for name, eq, _ in params)


def normalize_sql(sql: str) -> str:
    """A statement's shape: literals replaced by ``?`` and white space folded, so that the same query with
    other values is the same text (what the tables group by); literals never leave the process."""
    return _SPACES.sub(" ", _SQL_LITERAL.sub("?", sql)).strip()
