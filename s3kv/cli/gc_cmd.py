"""``s3kv gc``: plan deletions, show them, and carry them out safely.

The safety argument lives in :mod:`s3kv.gc`; this module adds what an
operator needs around it: a dry run, a confirmation that defaults to No, a
progress bar only on a terminal, and a report that still comes out when the
run is interrupted.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Annotated, Any

import typer

from s3kv.cli.common import (
    BackendOpt,
    BucketOpt,
    Conn,
    EndpointOpt,
    ExitCode,
    FormatOpt,
    OutputFormat,
    PrefixOpt,
    Progress,
    RegionOpt,
    cli_errors,
    confirm,
    connection,
    duration_option,
    echo,
    emit_json,
    format_age,
    format_size,
    make_catalog,
    multipart_admin,
    note,
    opened,
    render_table,
    run,
    size_option,
)
from s3kv.gc import DEFAULT_GRACE_S, Plan, Planner, Policies
from s3kv.gc_executor import Executor, GcResult


def register(app: typer.Typer) -> None:
    app.command("gc", help="Delete orphans, stale uploads, old chunks or whole namespaces.")(gc)


def gc(
    grace: Annotated[
        float, typer.Option("--grace", parser=duration_option, metavar="DURATION",
                            help="Leave unnamed shards and multipart uploads younger than "
                                 "this alone; must exceed the commit latency. [default: 1h]",
                            show_default=False)
    ] = DEFAULT_GRACE_S,
    older_than: Annotated[
        float | None, typer.Option("--older-than", parser=duration_option, metavar="DURATION",
                                   help="Delete chunks older than this (a chunk is as young "
                                        "as its youngest descendant), e.g. 7d.")
    ] = None,
    max_size: Annotated[
        int | None, typer.Option("--max-size", parser=size_option, metavar="SIZE",
                                 help="Evict oldest leaf chunks until committed bytes fit, "
                                      "e.g. 500GiB.")
    ] = None,
    namespaces: Annotated[
        list[str] | None, typer.Option("--namespace", metavar="NS",
                                       help="Delete this whole namespace (id or unique "
                                            "prefix); repeatable.")
    ] = None,
    orphans: Annotated[
        bool, typer.Option("--orphans/--no-orphans",
                           help="Delete shards no manifest names, once older than --grace.")
    ] = True,
    uploads: Annotated[
        bool, typer.Option("--uploads/--no-uploads",
                           help="Abort multipart uploads older than --grace.")
    ] = True,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the plan; delete nothing.")
    ] = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    fmt: FormatOpt = OutputFormat.table,
    bucket: BucketOpt = None,
    prefix: PrefixOpt = None,
    endpoint_url: EndpointOpt = None,
    region: RegionOpt = None,
    backend: BackendOpt = None,
) -> None:
    with cli_errors("gc") as scope:
        conn = scope.conn = connection(bucket, prefix, endpoint_url, region, backend)
        policies = Policies(grace_s=grace, orphans=orphans, uploads=uploads,
                            older_than_s=older_than, max_bytes=max_size)
        run(lambda: _gc(conn, policies, list(namespaces or []), dry_run, yes, fmt))


async def _gc(
    conn: Conn, policies: Policies, ns_args: list[str], dry_run: bool, yes: bool,
    fmt: OutputFormat,
) -> None:
    async with opened(conn) as store, (
            multipart_admin(conn, store) if policies.uploads
            else contextlib.nullcontext(None)) as admin:
        cat = make_catalog(conn, store)
        resolved = tuple(dict.fromkeys([await cat.resolve_namespace(n) for n in ns_args]))
        policies = dataclasses.replace(policies, namespaces=resolved)
        scanning = Progress("scanning namespaces")
        plan = await Planner(cat, policies, uploads_store=admin).plan(scanning.update)
        scanning.close()
        if dry_run or plan.empty:
            _report(conn, plan, None, dry_run, fmt)
            if plan.empty and fmt is OutputFormat.table:
                note("nothing to delete")
            if plan.errors:
                raise typer.Exit(ExitCode.FAILURE)
            return
        if not yes:
            if fmt is OutputFormat.table:
                _print_plan(plan)
            total = _plan_total(plan)
            question = (f"Delete {total['objects']} objects ({format_size(total['bytes'])}) "
                        f"and abort {len(plan.uploads)} uploads under {conn.where()}?")
            if not confirm(question):
                note("not confirmed; nothing deleted")
                raise typer.Exit(ExitCode.FAILURE)
        bar = Progress("deleting")
        result = GcResult()
        executor = Executor(store, conn.layout, grace_s=policies.grace_s,
                            concurrency=conn.settings.store.max_concurrency,
                            uploads_store=admin, on_progress=bar.update)
        try:
            await executor.execute(plan, result)
        except BaseException:
            bar.close()
            note(f"gc stopped after deleting {result.deleted_objects} objects "
                 f"({format_size(result.deleted_bytes)}); a new run picks up the rest")
            raise
        bar.close()
        _report(conn, plan, result, False, fmt, plan_printed=not yes)
        if result.errors or plan.errors:
            for err in [*plan.errors, *result.errors][:20]:
                note(f"error: {err}")
            raise typer.Exit(ExitCode.FAILURE)


def _plan_total(plan: Plan) -> dict[str, int]:
    totals = plan.totals()
    return {
        "chunks": sum(t.chunks for t in totals.values()),
        "objects": sum(t.objects for t in totals.values()),
        "bytes": sum(t.bytes for t in totals.values()),
    }


def plan_json(plan: Plan) -> dict[str, Any]:
    pol = plan.policies
    return {
        "policies": {
            "grace_s": pol.grace_s,
            "orphans": pol.orphans,
            "uploads": pol.uploads,
            "older_than_s": pol.older_than_s,
            "max_bytes": pol.max_bytes,
            "namespaces": list(pol.namespaces),
        },
        "by_policy": {r: t.to_json() for r, t in plan.totals().items()},
        "uploads": len(plan.uploads),
        "total": _plan_total(plan),
        "committed_bytes": plan.committed_bytes if _chain(plan) else None,
        "committed_bytes_after": plan.committed_bytes_after if _chain(plan) else None,
        "errors": list(plan.errors),
    }


def _chain(plan: Plan) -> bool:
    return plan.policies.older_than_s is not None or plan.policies.max_bytes is not None


def result_json(res: GcResult) -> dict[str, Any]:
    return {
        "deleted_objects": res.deleted_objects,
        "deleted_manifests": res.deleted_manifests,
        "deleted_shards": res.deleted_shards,
        "deleted_namespace_docs": res.deleted_namespace_docs,
        "deleted_bytes": res.deleted_bytes,
        "protected_shards": res.protected_shards,
        "aborted_uploads": res.aborted_uploads,
        "errors": list(res.errors),
    }


def _print_plan(plan: Plan) -> None:
    totals = plan.totals()
    rows = [[r, str(t.chunks), str(t.objects), format_size(t.bytes)]
            for r, t in totals.items() if t.chunks]
    rows.append(["uploads", "-", str(len(plan.uploads)), "-"])
    total = _plan_total(plan)
    rows.append(["TOTAL", str(total["chunks"]), str(total["objects"]),
                 format_size(total["bytes"])])
    echo(render_table(["POLICY", "CHUNKS", "OBJECTS", "SIZE"], rows, right=(1, 2, 3)))
    pol = plan.policies
    facts = [f"grace {format_age(pol.grace_s)}"]
    if _chain(plan):
        facts.append(f"committed {format_size(plan.committed_bytes)} -> "
                     f"{format_size(plan.committed_bytes_after)}")
    if pol.max_bytes is not None:
        facts.append(f"budget {format_size(pol.max_bytes)}")
    echo("; ".join(facts))


def _report(conn: Conn, plan: Plan, res: GcResult | None, dry_run: bool, fmt: OutputFormat,
            *, plan_printed: bool = False) -> None:
    if fmt is OutputFormat.json:
        emit_json({
            "bucket": conn.bucket,
            "prefix": conn.prefix,
            "dry_run": dry_run,
            "plan": plan_json(plan),
            "result": result_json(res) if res is not None else None,
        })
        return
    if not plan_printed:
        _print_plan(plan)
    if res is not None:
        echo(f"deleted {res.deleted_objects} objects ({res.deleted_manifests} manifests, "
             f"{res.deleted_shards} shards, {format_size(res.deleted_bytes)}); "
             f"kept {res.protected_shards} shards a re-check protected; "
             f"aborted {res.aborted_uploads} uploads")
