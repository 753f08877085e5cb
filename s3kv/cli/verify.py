"""``s3kv verify``: re-read shards the way a loading reader does, and report
chunks that would fail.

Verification goes through :mod:`s3kv.reader`, so it checks exactly what a
load checks. A chunk whose manifest disappears mid-check was deleted by a
GC, not broken, and is not reported. ``--repair`` deletes broken manifests:
the next reader then misses and recomputes, and the orphaned shards fall to
``s3kv gc`` after the grace period.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Annotated

import typer

from s3kv.catalog import Catalog, bounded_map
from s3kv.cli.common import (
    BackendOpt,
    BucketOpt,
    EndpointOpt,
    ExitCode,
    FormatOpt,
    OutputFormat,
    PrefixOpt,
    Progress,
    RegionOpt,
    cli_errors,
    connection,
    echo,
    emit_json,
    format_size,
    make_catalog,
    note,
    opened,
    render_table,
    run,
)
from s3kv.errors import IntegrityError, ManifestError
from s3kv.reader import read_shard
from s3kv.store.protocol import DELETE_BATCH, Delete


def register(app: typer.Typer) -> None:
    app.command("verify", help="Re-read shards and check sizes and checksums.")(verify)


@dataclass
class Broken:
    namespace: str
    chunk_id: str
    problem: str
    repaired: bool = False


@dataclass
class VerifyReport:
    chunks: int = 0
    shards: int = 0
    bytes: int = 0
    vanished: int = 0
    broken: list[Broken] = field(default_factory=list)


def verify(
    namespace: Annotated[
        str | None,
        typer.Argument(help="Only this namespace (id or unique prefix).", show_default=False),
    ] = None,
    sample: Annotated[
        int | None, typer.Option("--sample", min=1, metavar="N",
                                 help="Check N chunks picked uniformly at random.")
    ] = None,
    repair: Annotated[
        bool, typer.Option("--repair", help="Delete the manifests of broken chunks.")
    ] = False,
    seed: Annotated[
        int | None, typer.Option("--seed", help="Random seed for --sample (reproducible).")
    ] = None,
    fmt: FormatOpt = OutputFormat.table,
    bucket: BucketOpt = None,
    prefix: PrefixOpt = None,
    endpoint_url: EndpointOpt = None,
    region: RegionOpt = None,
    backend: BackendOpt = None,
) -> None:
    with cli_errors("verify") as scope:
        conn = scope.conn = connection(bucket, prefix, endpoint_url, region, backend)

        async def go() -> VerifyReport:
            async with opened(conn) as store:
                cat = make_catalog(conn, store)
                if namespace is not None:
                    names = [await cat.resolve_namespace(namespace)]
                else:
                    names = await cat.namespaces()
                report = await _verify(cat, names, sample, random.Random(seed))
                if repair and report.broken:
                    await _repair(cat, store, report)
                return report

        report = run(go)
        if fmt is OutputFormat.json:
            emit_json({
                "bucket": conn.bucket,
                "prefix": conn.prefix,
                "checked_chunks": report.chunks,
                "checked_shards": report.shards,
                "bytes_read": report.bytes,
                "vanished": report.vanished,
                "broken": [
                    {"namespace": b.namespace, "chunk_id": b.chunk_id, "problem": b.problem,
                     "repaired": b.repaired}
                    for b in report.broken
                ],
            })
        else:
            echo(f"checked {report.chunks} chunks, {report.shards} shards, "
                 f"{format_size(report.bytes)}: {len(report.broken)} broken")
            if report.broken:
                echo(render_table(
                    ["NAMESPACE", "CHUNK", "REPAIRED", "PROBLEM"],
                    [[b.namespace, b.chunk_id, "yes" if b.repaired else "no", b.problem]
                     for b in report.broken],
                ))
        if any(not b.repaired for b in report.broken):
            if not repair:
                note("run again with --repair to delete the broken manifests")
            raise typer.Exit(ExitCode.FAILURE)


async def _targets(cat: Catalog, names: list[str], sample: int | None,
                   rng: random.Random) -> AsyncGenerator[tuple[str, str], None]:
    """Committed chunks to check; a sample is drawn by reservoir, holding N ids."""
    if sample is None:
        for ns in names:
            async with contextlib.aclosing(cat.chunks(ns)) as groups:
                async for g in groups:
                    if g.manifest is not None:
                        yield ns, g.chunk_id
        return
    reservoir: list[tuple[str, str]] = []
    seen = 0
    for ns in names:
        async with contextlib.aclosing(cat.chunks(ns)) as groups:
            async for g in groups:
                if g.manifest is None:
                    continue
                seen += 1
                if len(reservoir) < sample:
                    reservoir.append((ns, g.chunk_id))
                elif (j := rng.randrange(seen)) < sample:
                    reservoir[j] = (ns, g.chunk_id)
    for item in reservoir:
        yield item


async def _verify(cat: Catalog, names: list[str], sample: int | None,
                  rng: random.Random) -> VerifyReport:
    report = VerifyReport()
    bar = Progress("verifying")

    async def check(target: tuple[str, str]) -> tuple[str, str, str | None, int, int, bool]:
        ns, cid = target
        try:
            manifest = await cat.read_manifest(ns, cid)
        except ManifestError as exc:
            return ns, cid, f"manifest: {exc}", 0, 0, False
        if manifest is None:
            return ns, cid, None, 0, 0, True
        shards = size = 0
        for entry in manifest.shards:
            try:
                await read_shard(cat.store, manifest, entry)
            except IntegrityError as exc:
                # Deleted by a GC between our manifest read and now? Then it
                # is gone, not broken.
                with contextlib.suppress(ManifestError):
                    if await cat.read_manifest(ns, cid) is None:
                        return ns, cid, None, shards, size, True
                return ns, cid, str(exc), shards, size, False
            shards += 1
            size += entry.size
        return ns, cid, None, shards, size, False

    async with contextlib.aclosing(
        bounded_map(_targets(cat, names, sample, rng), check, cat.concurrency)
    ) as results:
        async for ns, cid, problem, shards, size, vanished in results:
            if vanished:
                report.vanished += 1
                continue
            report.chunks += 1
            report.shards += shards
            report.bytes += size
            if problem is not None:
                report.broken.append(Broken(ns, cid, problem))
            bar.update(report.chunks, max(report.chunks, sample or report.chunks))
    bar.close()
    report.broken.sort(key=lambda b: (b.namespace, b.chunk_id))
    return report


async def _repair(cat: Catalog, store: Delete, report: VerifyReport) -> None:
    keys = [cat.layout.manifest(b.namespace, b.chunk_id) for b in report.broken]
    for i in range(0, len(keys), DELETE_BATCH):
        await store.delete_many(keys[i : i + DELETE_BATCH])
        for b in report.broken[i : i + DELETE_BATCH]:
            b.repaired = True
