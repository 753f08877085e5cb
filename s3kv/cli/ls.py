"""``s3kv ls`` and ``s3kv du``: what is cached, and what it costs.

Both stream the listing; ``ls NAMESPACE`` additionally reads every manifest
(bounded concurrency) because parent ids live only there, and keeps one
compact record per chunk to rebuild the chains.
"""

from __future__ import annotations

import contextlib
import enum
import time
from collections.abc import Iterable
from typing import Annotated, Any

import typer

from s3kv.catalog import Catalog
from s3kv.cli.common import (
    BackendOpt,
    BucketOpt,
    CliError,
    EndpointOpt,
    ExitCode,
    FormatOpt,
    OutputFormat,
    PrefixOpt,
    RegionOpt,
    cli_errors,
    connection,
    echo,
    emit_json,
    format_age,
    format_size,
    iso,
    make_catalog,
    note,
    opened,
    render_table,
    run,
    sort_rows,
)
from s3kv.inventory import CachedPrefix, ChunkRecord, NamespaceUsage, build_prefixes


class SortKey(str, enum.Enum):
    newest = "newest"
    oldest = "oldest"
    size = "size"
    chunks = "chunks"
    tokens = "tokens"
    name = "name"


SortOpt = Annotated[
    SortKey,
    typer.Option("--sort", "-s", case_sensitive=False,
                 help="newest/oldest: by age; size, chunks, tokens: largest first; "
                      "name: by id. tokens applies to `ls NAMESPACE` only."),
]
LimitOpt = Annotated[
    int | None, typer.Option("--limit", "-n", min=1, help="Show at most this many rows.")
]


def register(app: typer.Typer) -> None:
    app.command("ls", help="List namespaces, or the cached prefixes of one namespace.")(ls)
    app.command("du", help="Committed and orphaned bytes per namespace and in total.")(du)


# --- ls -----------------------------------------------------------------------


def ls(
    namespace: Annotated[
        str | None,
        typer.Argument(help="A namespace id or a unique prefix of one; omit to list them all.",
                       show_default=False),
    ] = None,
    fmt: FormatOpt = OutputFormat.table,
    sort: SortOpt = SortKey.newest,
    limit: LimitOpt = None,
    bucket: BucketOpt = None,
    prefix: PrefixOpt = None,
    endpoint_url: EndpointOpt = None,
    region: RegionOpt = None,
    backend: BackendOpt = None,
) -> None:
    with cli_errors("ls") as scope:
        conn = scope.conn = connection(bucket, prefix, endpoint_url, region, backend)
        if namespace is None and sort is SortKey.tokens:
            raise CliError("--sort tokens applies to `s3kv ls NAMESPACE` only", ExitCode.USAGE)

        async def go() -> None:
            async with opened(conn) as store:
                cat = make_catalog(conn, store)
                if namespace is None:
                    await _list_namespaces(cat, conn.bucket, conn.prefix, fmt, sort, limit)
                else:
                    ns = await cat.resolve_namespace(namespace)
                    await _list_prefixes(cat, ns, conn.bucket, conn.prefix, fmt, sort, limit)

        run(go)


def _model_label(fp: dict[str, Any] | None) -> str:
    if fp is None:
        return "-"
    model = str(fp.get("model", "-"))
    tag = fp.get("tag")
    if tag:
        model += f" [{tag}]"
    return model


def _tp_label(sizes: Iterable[int]) -> str:
    """The writer TP sizes present (a namespace is shared by every TP size)."""
    return ",".join(str(n) for n in sorted(set(sizes))) or "-"


async def _list_namespaces(
    cat: Catalog, bucket: str, prefix: str, fmt: OutputFormat, sort: SortKey, limit: int | None
) -> None:
    rows: list[tuple[NamespaceUsage, dict[str, Any] | None]] = []
    for ns in await cat.namespaces():
        rows.append((await cat.usage(ns), await cat.fingerprint(ns)))
    keys = {
        SortKey.newest: (lambda r: r[0].newest or 0.0, True),
        SortKey.oldest: (lambda r: r[0].oldest or float("inf"), False),
        SortKey.size: (lambda r: r[0].committed_bytes, True),
        SortKey.chunks: (lambda r: r[0].chunks, True),
        SortKey.name: (lambda r: r[0].namespace or "", False),
    }
    key, reverse = keys[sort]
    rows = sort_rows(rows, key, reverse=reverse, limit=limit)
    if fmt is OutputFormat.json:
        emit_json({
            "bucket": bucket,
            "prefix": prefix,
            "namespaces": [
                {
                    "namespace": u.namespace,
                    "fingerprint": fp,
                    "writer_tp_sizes": sorted(u.writer_tps),
                    "chunks": u.chunks,
                    "bytes": u.committed_bytes,
                    "oldest": iso(u.oldest),
                    "newest": iso(u.newest),
                }
                for u, fp in rows
            ],
        })
        return
    if not rows:
        note(f"no namespaces under s3://{bucket}/{prefix}/")
        return
    now = time.time()
    table = []
    for u, fp in rows:
        table.append([
            u.namespace or "", _model_label(fp), _tp_label(u.writer_tps), str(u.chunks),
            format_size(u.committed_bytes),
            format_age(now - u.oldest if u.oldest else None),
            format_age(now - u.newest if u.newest else None),
        ])
    echo(render_table(["NAMESPACE", "MODEL", "TP", "CHUNKS", "SIZE", "OLDEST", "NEWEST"],
                      table, right=(2, 3, 4, 5, 6)))


async def _list_prefixes(
    cat: Catalog, ns: str, bucket: str, prefix: str, fmt: OutputFormat, sort: SortKey,
    limit: int | None,
) -> None:
    records: list[ChunkRecord] = []
    invalid = 0
    async with contextlib.aclosing(cat.records(ns)) as items:
        async for item in items:
            if isinstance(item, ChunkRecord):
                records.append(item)
            else:
                invalid += 1
    fp = await cat.fingerprint(ns)
    chunks, total = len(records), sum(r.bytes for r in records)
    tps = {r.tp_size for r in records}
    prefixes = build_prefixes(records)
    del records
    keys = {
        SortKey.newest: (lambda p: p.newest, True),
        SortKey.oldest: (lambda p: p.oldest, False),
        SortKey.size: (lambda p: p.bytes, True),
        SortKey.chunks: (lambda p: p.chunks, True),
        SortKey.tokens: (lambda p: p.tokens, True),
        SortKey.name: (lambda p: p.leaf, False),
    }
    key, reverse = keys[sort]
    count = len(prefixes)
    shown: list[CachedPrefix] = sort_rows(prefixes, key, reverse=reverse, limit=limit)
    if invalid:
        note(f"warning: {invalid} chunks of {ns} have undecodable manifests "
             f"(`s3kv verify {ns[:8]} --repair` removes them)")
    if fmt is OutputFormat.json:
        emit_json({
            "bucket": bucket,
            "prefix": prefix,
            "namespace": ns,
            "fingerprint": fp,
            "writer_tp_sizes": sorted(tps),
            "chunks": chunks,
            "bytes": total,
            "invalid_manifests": invalid,
            "prefix_count": count,
            "prefixes": [
                {
                    "leaf": p.leaf,
                    "chunks": p.chunks,
                    "tokens": p.tokens,
                    "bytes": p.bytes,
                    "oldest": iso(p.oldest),
                    "newest": iso(p.newest),
                    "complete": p.complete,
                }
                for p in shown
            ],
        })
        return
    note(f"namespace {ns}  model {_model_label(fp)}  writer tp {_tp_label(tps)}  "
         f"{chunks} chunks  {format_size(total)}  "
         f"{count} prefixes")
    now = time.time()
    echo(render_table(
        ["LEAF", "CHUNKS", "TOKENS", "SIZE", "AGE", "OLDEST", "COMPLETE"],
        [[p.leaf[:16], str(p.chunks), str(p.tokens), format_size(p.bytes),
          format_age(now - p.newest), format_age(now - p.oldest),
          "yes" if p.complete else "no (hole)"] for p in shown],
        right=(1, 2, 3, 4, 5),
    ))


# --- du -----------------------------------------------------------------------


def du(
    namespace: Annotated[
        str | None,
        typer.Argument(help="Only this namespace (id or unique prefix).", show_default=False),
    ] = None,
    exact: Annotated[
        bool, typer.Option("--exact", help="Read every manifest instead of only those of "
                                           "chunks with shards from several save "
                                           "attempts (engines or rounds).")
    ] = False,
    fmt: FormatOpt = OutputFormat.table,
    bucket: BucketOpt = None,
    prefix: PrefixOpt = None,
    endpoint_url: EndpointOpt = None,
    region: RegionOpt = None,
    backend: BackendOpt = None,
) -> None:
    with cli_errors("du") as scope:
        conn = scope.conn = connection(bucket, prefix, endpoint_url, region, backend)

        async def go() -> list[NamespaceUsage]:
            async with opened(conn) as store:
                cat = make_catalog(conn, store)
                if namespace is not None:
                    names = [await cat.resolve_namespace(namespace)]
                else:
                    names = await cat.namespaces()
                return [await cat.usage(ns, exact=exact) for ns in names]

        usages = run(go)
        total = NamespaceUsage(None)
        for u in usages:
            total.merge(u)
        if fmt is OutputFormat.json:
            emit_json({
                "bucket": conn.bucket,
                "prefix": conn.prefix,
                "namespaces": [usage_json(u) for u in usages],
                "total": usage_json(total),
            })
            return
        rows = [[u.namespace or "", str(u.chunks), str(u.objects), format_size(u.committed_bytes),
                 format_size(u.orphan_bytes), str(u.orphan_objects), format_size(u.bytes)]
                for u in [*usages, total]]
        rows[-1][0] = "TOTAL"
        echo(render_table(
            ["NAMESPACE", "CHUNKS", "OBJECTS", "COMMITTED", "ORPHANED", "ORPHAN-OBJECTS", "TOTAL"],
            rows, right=(1, 2, 3, 4, 5, 6),
        ))


def usage_json(u: NamespaceUsage) -> dict[str, Any]:
    doc: dict[str, Any] = {} if u.namespace is None else {"namespace": u.namespace}
    doc.update({
        "chunks": u.chunks,
        "uncommitted_chunks": u.uncommitted_chunks,
        "invalid_manifests": u.invalid_manifests,
        "objects": u.objects,
        "manifests": u.manifests,
        "shards": u.shards,
        "foreign_objects": u.foreign_objects,
        "committed_bytes": u.committed_bytes,
        "orphan_bytes": u.orphan_bytes,
        "orphan_objects": u.orphan_objects,
        "foreign_bytes": u.foreign_bytes,
        "bytes": u.bytes,
        "oldest": iso(u.oldest),
        "newest": iso(u.newest),
    })
    return doc
