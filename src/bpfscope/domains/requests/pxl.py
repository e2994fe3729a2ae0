"""A DataFrame API modelled on Pixie's PxL, compiled to DuckDB SQL over the store, so that PxL scripts
port with few changes (``import px`` works in a script run by ``bpfscope query --script``)::

    import px
    df = px.DataFrame(table='http_events', start_time='-5m')
    df = df[df.resp_status >= 400]
    df.failure = df.resp_status >= 500
    df = df.groupby(['req_path', 'failure']).agg(count=('latency', px.count),
                                                 latency=('latency', px.quantiles))
    df.p99_ms = px.pluck_float64(df.latency, 'p99') / 1e6
    px.display(df, 'errors')

Each operation wraps the previous query in a new one; nothing runs until :func:`display` (or
:meth:`DataFrame.collect`). Values from the script are bound as parameters, never pasted into the
SQL. What is and is not supported is in docs/requests.md ("PxL").
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from bpfscope.errors import BpfscopeError

# Pixie's names for bpfscope's columns: time_ (a timestamp, UTC) is ts, upid is the process.
ALIASES = {"time_": "make_timestamp(CAST(ts * 1e6 AS BIGINT))", "upid": "pid"}
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_RELATIVE = re.compile(r"-(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNIT_S = {"ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def _ident(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise BpfscopeError(f"not a column name: {name!r}")
    return f'"{name}"'


@dataclass(frozen=True)
class Expr:
    """A column expression: SQL text with ``?`` for the values bound to it."""

    sql: str
    params: tuple[Any, ...] = ()

    def _op(self, op: str, other: Any, swap: bool = False) -> Expr:
        right = lit(other)
        left, right = (right, self) if swap else (self, right)
        return Expr(f"({left.sql} {op} {right.sql})", left.params + right.params)

    def __eq__(self, other: Any) -> Expr:  # type: ignore[override]
        return self._op("=", other)

    def __ne__(self, other: Any) -> Expr:  # type: ignore[override]
        return self._op("<>", other)

    def __lt__(self, other: Any) -> Expr:
        return self._op("<", other)

    def __le__(self, other: Any) -> Expr:
        return self._op("<=", other)

    def __gt__(self, other: Any) -> Expr:
        return self._op(">", other)

    def __ge__(self, other: Any) -> Expr:
        return self._op(">=", other)

    def __add__(self, other: Any) -> Expr:
        return self._op("+", other)

    def __radd__(self, other: Any) -> Expr:
        return self._op("+", other, swap=True)

    def __sub__(self, other: Any) -> Expr:
        return self._op("-", other)

    def __rsub__(self, other: Any) -> Expr:
        return self._op("-", other, swap=True)

    def __mul__(self, other: Any) -> Expr:
        return self._op("*", other)

    def __rmul__(self, other: Any) -> Expr:
        return self._op("*", other, swap=True)

    def __truediv__(self, other: Any) -> Expr:
        return self._op("/", other)

    def __mod__(self, other: Any) -> Expr:
        return self._op("%", other)

    def __and__(self, other: Any) -> Expr:
        return self._op("AND", other)

    def __or__(self, other: Any) -> Expr:
        return self._op("OR", other)

    def __invert__(self) -> Expr:
        return Expr(f"(NOT {self.sql})", self.params)

    def __hash__(self) -> int:
        return hash((self.sql, self.params))

    def __bool__(self) -> bool:
        raise BpfscopeError("a column expression has no truth value: use & | ~, not and/or/not")


def lit(value: Any) -> Expr:
    if isinstance(value, Expr):
        return value
    if isinstance(value, DataFrame):
        raise BpfscopeError("a DataFrame is not a value")
    return Expr("?", (value,))


def _call(name: str, *args: Any) -> Expr:
    exprs = [lit(a) for a in args]
    return Expr(f"{name}({', '.join(e.sql for e in exprs)})", tuple(p for e in exprs for p in e.params))


# --- aggregates: (column, px.FUNCTION) in agg() ------------------------------------------------------
@dataclass(frozen=True)
class Aggregate:
    name: str
    template: str  # {x} is the column


count = Aggregate("count", "count({x})")
sum = Aggregate("sum", "sum({x})")
mean = Aggregate("mean", "avg({x})")
min = Aggregate("min", "min({x})")
max = Aggregate("max", "max({x})")
any = Aggregate("any", "any_value({x})")
# PxL's quantiles: a JSON object of p01, p10, p50, p90, p99 (read with pluck_float64).
quantiles = Aggregate(
    "quantiles",
    "to_json({{'p01': quantile_cont({x}, 0.01), 'p10': quantile_cont({x}, 0.10), "
    "'p50': quantile_cont({x}, 0.50), 'p90': quantile_cont({x}, 0.90), 'p99': quantile_cont({x}, 0.99)}})",
)


# --- scalar functions ---------------------------------------------------------------------------------
def pluck_float64(column: Expr, key: str) -> Expr:
    if not _NAME.fullmatch(key):
        raise BpfscopeError(f"not a key: {key!r}")
    return Expr(f"CAST(json_extract({column.sql}, '$.{key}') AS DOUBLE)", column.params)


def pluck(column: Expr, key: str) -> Expr:
    if not _NAME.fullmatch(key):
        raise BpfscopeError(f"not a key: {key!r}")
    return Expr(f"json_extract_string({column.sql}, '$.{key}')", column.params)


def contains(column: Expr, text: str) -> Expr:
    return _call("contains", column, text)


def substring(column: Expr, start: int, length: int) -> Expr:
    return _call("substring", column, start + 1, length)


def select(condition: Expr, then: Any, otherwise: Any) -> Expr:
    c, t, o = lit(condition), lit(then), lit(otherwise)
    return Expr(f"CASE WHEN {c.sql} THEN {t.sql} ELSE {o.sql} END", c.params + t.params + o.params)


def nanoseconds(n: float) -> Expr:
    return _call("to_microseconds", lit(n) / 1000)


def seconds(n: float) -> Expr:
    return _call("to_seconds", n)


def minutes(n: float) -> Expr:
    return _call("to_minutes", n)


def hours(n: float) -> Expr:
    return _call("to_hours", n)


def now() -> Expr:
    return Expr("now()")


def bin(column: Expr, width: Expr) -> Expr:
    """The start of the window of ``width`` (px.seconds(10)) that a time falls in."""
    return Expr(f"time_bucket({width.sql}, {column.sql})", width.params + column.params)


def parse_time(value: Any) -> float | None:
    """PxL's start_time/end_time: '-5m', '-30s', ..., or epoch seconds."""
    if value is None:
        return None
    if isinstance(value, int | float):
        return float(value)
    match = _RELATIVE.fullmatch(str(value).strip())
    if not match:
        raise BpfscopeError(f"not a time: {value!r} (give '-5m', '-30s', '-1h' or epoch seconds)")
    return time.time() - float(match.group(1)) * _UNIT_S[match.group(2)]


# --- the DataFrame ------------------------------------------------------------------------------------
@dataclass
class _Query:
    sql: str
    params: tuple[Any, ...] = ()
    tables: frozenset[str] = frozenset()


class DataFrame:
    """A table of the store (``table=``), or what operations made of one."""

    def __init__(
        self,
        table: str | None = None,
        start_time: Any = None,
        end_time: Any = None,
        select: Sequence[str] | None = None,
        _query: _Query | None = None,
    ) -> None:
        if _query is None:
            if not table or not re.fullmatch(r"[a-z][a-z0-9_.]*", table):
                raise BpfscopeError(f"not a table: {table!r}")
            where, params = [], []
            for op, value in ((">=", parse_time(start_time)), ("<", parse_time(end_time))):
                if value is not None:
                    where.append(f"ts {op} ?")
                    params.append(value)
            aliases = ", ".join(f"{sql} AS {name}" for name, sql in ALIASES.items())
            sql = f'SELECT *, {aliases} FROM "{table}"' + (f" WHERE {' AND '.join(where)}" if where else "")
            _query = _Query(sql, tuple(params), frozenset({table}))
        object.__setattr__(self, "_q", _query)
        if select is not None:
            object.__setattr__(self, "_q", self[list(select)]._q)

    # columns
    def __getattr__(self, name: str) -> Expr:
        if name.startswith("_"):
            raise AttributeError(name)
        return Expr(_ident(name))

    def __setattr__(self, name: str, value: Any) -> None:
        """df.name = expression: a new column, or a new value for one (DuckDB's REPLACE)."""
        expr = lit(value)
        q: _Query = self._q
        if name in self._columns():
            sql = f"SELECT * REPLACE ({expr.sql} AS {_ident(name)}) FROM ({q.sql})"
        else:
            sql = f"SELECT *, {expr.sql} AS {_ident(name)} FROM ({q.sql})"
        object.__setattr__(self, "_q", _Query(sql, expr.params + q.params, q.tables))

    def __getitem__(self, key: Any) -> Any:
        q: _Query = self._q
        if isinstance(key, str):
            return Expr(_ident(key))
        if isinstance(key, list):
            columns = ", ".join(_ident(k) for k in key)
            return DataFrame(_query=_Query(f"SELECT {columns} FROM ({q.sql})", q.params, q.tables))
        if isinstance(key, Expr):
            return DataFrame(
                _query=_Query(f"SELECT * FROM ({q.sql}) WHERE {key.sql}", q.params + key.params, q.tables)
            )
        raise BpfscopeError(f"cannot index a DataFrame with {type(key).__name__}")

    def filter(self, condition: Expr) -> DataFrame:
        return self[condition]

    def drop(self, columns: str | Sequence[str]) -> DataFrame:
        names = [columns] if isinstance(columns, str) else list(columns)
        q: _Query = self._q
        return DataFrame(
            _query=_Query(
                f"SELECT * EXCLUDE ({', '.join(map(_ident, names))}) FROM ({q.sql})", q.params, q.tables
            )
        )

    def head(self, n: int = 5) -> DataFrame:
        q: _Query = self._q
        return DataFrame(_query=_Query(f"SELECT * FROM ({q.sql}) LIMIT ?", (*q.params, int(n)), q.tables))

    def sort(self, by: str | Sequence[str], ascending: bool = True) -> DataFrame:
        """Not PxL (whose tables are sorted in the UI): ordered output for a terminal."""
        names = [by] if isinstance(by, str) else list(by)
        order = ", ".join(f"{_ident(n)} {'ASC' if ascending else 'DESC'}" for n in names)
        q: _Query = self._q
        return DataFrame(_query=_Query(f"SELECT * FROM ({q.sql}) ORDER BY {order}", q.params, q.tables))

    def groupby(self, columns: str | Sequence[str]) -> GroupBy:
        return GroupBy(self, [columns] if isinstance(columns, str) else list(columns))

    def agg(self, **aggregates: tuple[str, Aggregate]) -> DataFrame:
        """Aggregates over the whole table (PxL: df.agg(...) without groupby)."""
        return GroupBy(self, []).agg(**aggregates)

    def merge(
        self,
        right: DataFrame,
        how: str = "inner",
        left_on: str | Sequence[str] = (),
        right_on: str | Sequence[str] = (),
        suffixes: Sequence[str] = ("", "_x"),
    ) -> DataFrame:
        kinds = {"inner": "INNER", "left": "LEFT", "right": "RIGHT", "outer": "FULL OUTER"}
        if how not in kinds:
            raise BpfscopeError(f"merge how={how!r}: one of {', '.join(kinds)}")
        lefts = [left_on] if isinstance(left_on, str) else list(left_on)
        rights = [right_on] if isinstance(right_on, str) else list(right_on)
        if len(lefts) != len(rights) or not lefts:
            raise BpfscopeError("merge needs as many left_on as right_on columns, at least one")
        lq: _Query = self._q
        rq: _Query = right._q
        left_cols, right_cols = self._columns(), right._columns()
        out = [f"l.{_ident(c)} AS {_ident(c + suffixes[0] if c in right_cols else c)}" for c in left_cols]
        out += [f"r.{_ident(c)} AS {_ident(c + suffixes[1] if c in left_cols else c)}" for c in right_cols]
        on = " AND ".join(f"l.{_ident(a)} = r.{_ident(b)}" for a, b in zip(lefts, rights, strict=True))
        sql = f"SELECT {', '.join(out)} FROM ({lq.sql}) l {kinds[how]} JOIN ({rq.sql}) r ON {on}"
        return DataFrame(_query=_Query(sql, lq.params + rq.params, lq.tables | rq.tables))

    # running
    def to_sql(self) -> tuple[str, tuple[Any, ...]]:
        q: _Query = self._q
        return q.sql, q.params

    def _columns(self) -> list[str]:
        q: _Query = self._q
        con = _connection(q.tables)
        try:
            return [d[0] for d in con.execute(f"SELECT * FROM ({q.sql}) LIMIT 0", list(q.params)).description]
        except Exception as exc:
            raise BpfscopeError(f"query failed: {str(exc).splitlines()[0]}") from None

    def collect(self) -> tuple[list[str], list[tuple[Any, ...]]]:
        q: _Query = self._q
        con = _connection(q.tables)
        try:
            cursor = con.execute(q.sql, list(q.params))
            return [d[0] for d in cursor.description], cursor.fetchall()
        except Exception as exc:
            raise BpfscopeError(f"query failed: {str(exc).splitlines()[0]}") from None


@dataclass
class GroupBy:
    frame: DataFrame
    columns: list[str]

    def agg(self, **aggregates: tuple[str, Aggregate]) -> DataFrame:
        parts = [_ident(c) for c in self.columns]
        for name, spec in aggregates.items():
            if not (isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[1], Aggregate)):
                raise BpfscopeError(f"agg {name}=: give (column, px.FUNCTION), e.g. ('latency', px.mean)")
            column, function = spec
            parts.append(f"{function.template.format(x=_ident(column))} AS {_ident(name)}")
        q: _Query = self.frame._q
        group = f" GROUP BY {', '.join(_ident(c) for c in self.columns)}" if self.columns else ""
        return DataFrame(
            _query=_Query(f"SELECT {', '.join(parts)} FROM ({q.sql}){group}", q.params, q.tables)
        )


# --- where the data is and where the results go -----------------------------------------------------
@dataclass
class _Context:
    store: Any = None  # a bpfscope.sinks.store.Store
    displays: list[tuple[str, DataFrame]] = field(default_factory=list)


_context = _Context()


def _connection(tables: frozenset[str]) -> Any:
    if _context.store is None:
        raise BpfscopeError("no store to read: run scripts with bpfscope query --script")
    con = _context.store.connect(only=tables)
    missing = [t for t in tables if t not in _context.store.tables()]
    for table in missing:
        schema = _schemas().get(table)
        if schema is None:
            raise BpfscopeError(f"no table {table!r} in the store")
        from bpfscope.sinks.store import SQL_TYPES

        columns = ", ".join(f"{_ident(f.name)} {SQL_TYPES[f.type]}" for f in schema.fields)
        con.execute(f'CREATE TABLE "{table}" ({columns})')  # empty: the store has none yet
    return con


def _schemas() -> dict[str, Any]:
    from bpfscope.domains.requests import records, stats

    return {s.name: s for s in (*records.SCHEMAS.values(), stats.CONN_STATS, stats.PROCESS_STATS)}


def display(frame: DataFrame, name: str = "output") -> None:
    """Show a DataFrame (PxL's px.display): the results of a script, in the order displayed."""
    if not isinstance(frame, DataFrame):
        raise BpfscopeError("px.display takes a DataFrame")
    _context.displays.append((name, frame))


def run_script(
    source: str, store: Any, filename: str = "<script>"
) -> list[tuple[str, list[str], list[tuple]]]:
    """Run a PxL-style script against ``store``: (name, columns, rows) per px.display, in order."""
    import sys

    _context.store, _context.displays = store, []
    module = sys.modules[__name__]
    previous = sys.modules.get("px")
    sys.modules["px"] = module  # `import px` in the script
    try:
        code = compile(source, filename, "exec")
        exec(code, {"__name__": "__px_script__", "px": module, "__builtins__": __builtins__})
        return [(name, *frame.collect()) for name, frame in _context.displays]
    except SyntaxError as exc:
        raise BpfscopeError(f"{filename}:{exc.lineno}: {exc.msg}") from None
    except BpfscopeError:
        raise
    except Exception as exc:
        # The script's own mistake: one line, where it happened in the script.
        import traceback

        line = next(
            (f.lineno for f in reversed(traceback.extract_tb(exc.__traceback__)) if f.filename == filename), 0
        )
        raise BpfscopeError(f"{filename}:{line}: {type(exc).__name__}: {exc}") from None
    finally:
        if previous is None:
            sys.modules.pop("px", None)
        else:
            sys.modules["px"] = previous
        _context.store, _context.displays = None, []
