"""``featcache cache ls|info|verify|rm``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import FeatcacheError
from .app import app, cache_app
from .options import CacheDir, cache_folder

Target = Annotated[str, typer.Argument(help="A cache key (as in `cache ls`), file name or path.")]


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return str(n)


@cache_app.command("ls")
def ls(cache_dir: CacheDir = "cache") -> None:
    """List cache files: key, backbone, size, split, view, rows, width, dtype, bytes."""
    from ..cache import list_caches

    rows = list_caches(cache_folder(cache_dir))
    if not rows:
        typer.echo(f"no cache files in {cache_dir}")
        return
    typer.echo(f"{'key':<12} {'backbone':<20} {'size':>4} {'split':<5} {'view':<4} {'rows':>7} {'width':>5} "
               f"{'dtype':<7} {'bytes':>8}  data")
    for r in rows:
        if "error" in r:
            typer.echo(f"{'?':<12} {Path(r['path']).name}: {r['error']}")
            continue
        typer.echo(f"{r['key']:<12} {r['backbone']:<20} {r['size']:>4} {r['split']:<5} {r['view']:<4} "
                   f"{r['n_rows']:>7} {r['width']:>5} {r['dtype']:<7} {_size(r['bytes']):>8}  {r.get('data_source', '')}")


@cache_app.command()
def info(target: Target, cache_dir: CacheDir = "cache") -> None:
    """Print every attribute of one cache file."""
    from ..cache import read_attrs, resolve

    path = resolve(cache_folder(cache_dir), target)
    attrs = read_attrs(path)
    typer.echo(f"path: {path}")
    for name in sorted(attrs):
        value = attrs[name]
        if isinstance(value, str) and value[:1] in "[{":
            try:
                value = json.dumps(json.loads(value))
            except ValueError:
                pass
        typer.echo(f"{name}: {value}")


@cache_app.command()
def verify(
    target: Annotated[Optional[str], typer.Argument(help="A cache key, file name or path.")] = None,
    all_: Annotated[bool, typer.Option("--all", help="Verify every cache file in the folder.")] = False,
    cache_dir: CacheDir = "cache",
) -> None:
    """Recompute checksums and check schema, shapes and completeness; exit 1 on any failure."""
    from ..cache import check, list_caches, resolve

    cache_folder(cache_dir)
    if all_ == (target is not None):
        raise FeatcacheError("Give either a KEY/PATH or --all.")
    paths = [Path(r["path"]) for r in list_caches(cache_dir)] if all_ else [resolve(cache_dir, target)]
    failures = 0
    for path in paths:
        try:
            check(path, full=True)
            typer.echo(f"ok      {path}")
        except FeatcacheError as exc:
            failures += 1
            typer.echo(f"FAILED  {exc}")
    if failures:
        raise FeatcacheError(f"{failures} of {len(paths)} cache file(s) failed verification.")


@cache_app.command()
def rm(target: Target, cache_dir: CacheDir = "cache") -> None:
    """Remove one cache file with its lock and any unfinished parts."""
    from ..cache import owned_cache, remove

    for removed in remove(owned_cache(cache_folder(cache_dir), target)):
        typer.echo(f"removed {removed}")


@app.command()
def clean(cache_dir: Annotated[str, typer.Option("--cache-dir", help="The cache folder to empty.")] = "cache") -> None:
    """Remove what featcache made in a cache folder (caches, parts, locks, runs, engines, datasets, weights).

    Anything featcache does not recognise as its own is kept and listed.
    """
    from ..cleaning import clean as clean_folder

    report = clean_folder(cache_dir)
    for path in report.removed:
        typer.echo(f"removed {path}")
    for path in report.busy:
        typer.echo(f"in use  {path} (another featcache process holds its lock; kept)")
    for path in report.kept:
        typer.echo(f"kept    {path} (not featcache's)")
    typer.echo(f"{len(report.removed)} removed, {len(report.kept) + len(report.busy)} kept in {cache_dir}")
