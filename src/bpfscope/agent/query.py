"""bpfscope query: SQL over the store, also while the agent writes it (readers see whole files only)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import click

from bpfscope.agent.config import DEFAULT_STORE
from bpfscope.errors import BpfscopeError
from bpfscope.runtime.schema import Field, Schema

TABLE_SCHEMA = Schema(
    "store.table",
    (
        Field("table", "str", label=True, doc='quote it in SQL: "check.row"'),
        Field("rows", "int"),
        Field("files", "int", doc="Parquet files (one per flush, merged by the hour)"),
        Field("bytes", "int", "bytes"),
        Field("first_ts", "float", "s", nullable=True, doc="its oldest record"),
        Field("last_ts", "float", "s", nullable=True, doc="its newest record"),
    ),
    doc="One table of the store (--tables).",
)
SCHEMAS = (TABLE_SCHEMA,)

EXAMPLES = f"""
\b
Examples:
  bpfscope query --tables                          # what the store holds
  bpfscope query 'SELECT resource, metric, verdict, text FROM "check.row" ORDER BY ts DESC LIMIT 20'
  bpfscope query --json 'SELECT comm, count(*) AS n FROM http_events GROUP BY comm'
  bpfscope query --store /var/tmp/store 'DESCRIBE "profile.stack"'
  bpfscope query --script slow_sql                 # a ready PxL-style script (--scripts lists them)
  bpfscope query --script ./my_script.py           # your own: `import px`, px.DataFrame(...), px.display
  bpfscope query --map --since -10m --html map.html  # the service map: table, and a page with its picture
Tables are named after their records; quote names with a dot. The store is {DEFAULT_STORE} by default.
"""


def table_records(store: Any) -> Iterator[dict[str, Any]]:
    con = store.connect()
    try:
        for table in store.tables():
            files = list((store.path / table).glob("date=*/hour=*/*.parquet"))
            if not files:
                continue
            rows, first, last = con.execute(f'SELECT count(*), min(ts), max(ts) FROM "{table}"').fetchone()
            yield TABLE_SCHEMA.record(
                {
                    "ts": time.time(),
                    "table": table,
                    "rows": rows,
                    "files": len(files),
                    "bytes": sum(f.stat().st_size for f in files),
                    "first_ts": first,
                    "last_ts": last,
                }
            )
    finally:
        con.close()


def _plain(value: Any) -> Any:
    if isinstance(value, str) and value[:1] in "[{":
        try:
            return json.loads(value)  # a JSON column
        except ValueError:
            return value
    if isinstance(value, int | float | str | bool) or value is None:
        return value
    return str(value)


@click.command(name="query", epilog=EXAMPLES)
@click.argument("sql", required=False)
@click.option("--store", default=DEFAULT_STORE, show_default=True, metavar="DIR", help="The store to read.")
@click.option("--tables", is_flag=True, help="List the tables: rows, files, bytes, time span.")
@click.option(
    "--script",
    metavar="FILE|NAME",
    help="Run a PxL-style script (a file, or a ready one by name: see --scripts) instead of SQL.",
)
@click.option("--scripts", "list_scripts", is_flag=True, help="List the ready PxL-style scripts.")
@click.option(
    "--map", "service_map", is_flag=True, help="The service map of the requests stored: who calls whom."
)
@click.option(
    "--since",
    default="-5m",
    show_default=True,
    metavar="AGE",
    help="With --map: the requests of this last span.",
)
@click.option("--svg", metavar="FILE", help="With --map: draw it as an SVG picture too.")
@click.option("--html", "html_file", metavar="FILE", help="With --map: an HTML page (picture and table) too.")
@click.option("--json", "as_json", is_flag=True, help="JSON lines (one object per row) instead of a table.")
@click.option(
    "-r",
    "--rows",
    "max_rows",
    type=click.IntRange(min=1),
    default=1000,
    show_default=True,
    help="Rows shown.",
)
def command(
    sql: str | None,
    store: str,
    tables: bool,
    script: str | None,
    list_scripts: bool,
    service_map: bool,
    since: str,
    svg: str | None,
    html_file: str | None,
    as_json: bool,
    max_rows: int,
) -> None:
    """Run SQL (DuckDB's dialect) over the store's tables: one per kind of record, named after it
    ("check.row", "profile.stack", http_events, ...), partitioned by date and hour. The agent may be
    writing meanwhile: a query reads the files flushed so far."""
    from bpfscope.sinks.store import Store
    from bpfscope.sinks.terminal import Terminal

    if list_scripts:
        from bpfscope.domains.requests.scripting import ready_scripts

        for name, summary in ready_scripts().items():
            click.echo(f"{name:<16} {summary}")
        return
    data = Store(store)
    if not data.path.is_dir():
        raise BpfscopeError(f"no store at {store}", hint="bpfscope agent writes one; --store names another")
    if service_map:
        _service_map(data, since, svg, html_file, as_json)
        return
    if script:
        from bpfscope.domains.requests.scripting import run

        results = run(script, data)
        for name, columns, rows in results:
            _show(name, columns, [list(r) for r in rows[:max_rows]], as_json, len(results) > 1)
        return
    if tables:
        records = list(table_records(data))
        columns, rows = TABLE_SCHEMA.names, [[r[c] for c in TABLE_SCHEMA.names] for r in records]
    elif sql:
        import duckdb

        con = data.connect()
        try:
            cursor = con.execute(sql)
            columns = [d[0] for d in cursor.description] if cursor.description else []
            rows = [list(row) for row in cursor.fetchmany(max_rows)] if columns else []
        except duckdb.Error as exc:
            raise BpfscopeError(f"query failed: {str(exc).splitlines()[0]}") from None
        finally:
            con.close()
        records = [{c: _plain(v) for c, v in zip(columns, row, strict=True)} for row in rows]
    else:
        raise BpfscopeError("give SQL to run, or --tables", hint="see bpfscope query --help")
    if as_json:
        click.echo(
            "\n".join(json.dumps(r, default=str) for r in records) + ("\n" if records else ""), nl=False
        )
        return
    from rich.markup import escape

    term = Terminal()
    term.table(columns, [["" if v is None else escape(str(v)) for v in row] for row in rows])
    term.flush()


def _service_map(data: Any, since: str, svg: str | None, html_file: str | None, as_json: bool) -> None:
    from pathlib import Path

    from bpfscope.domains.requests import servicemap
    from bpfscope.domains.requests.pxl import parse_time

    end = time.time()
    smap = servicemap.build(data, parse_time(since) or 0.0, end)
    if svg:
        Path(svg).write_text(servicemap.svg(smap))
    if html_file:
        Path(html_file).write_text(servicemap.page(smap))
    if as_json:
        click.echo(json.dumps(smap.to_dict()))
        return
    _show("service map", list(servicemap.ServiceMap.COLUMNS), smap.rows(), False, False)


def _show(name: str, columns: list[str], rows: list[list[Any]], as_json: bool, titled: bool) -> None:
    """One px.display of a script: JSON lines with its name, or a table under its name."""
    if as_json:
        for row in rows:
            values = {c: _plain(v) for c, v in zip(columns, row, strict=True)}
            click.echo(json.dumps({"display": name, **values}, default=str))
        return
    from rich.markup import escape

    from bpfscope.sinks.terminal import Terminal

    term = Terminal()
    term.table(
        columns,
        [["" if v is None else escape(str(v)) for v in row] for row in rows],
        title=name if titled else None,
    )
    term.flush()
