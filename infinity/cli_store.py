"""`infinity store ls|fsck|compact`: parse, open the store, call it, print (cli.py adds the group).

PATHS are a store's directories (several: a striped store, in its order) or the folder that
`infinity convert` wrote (model.json; its store in data/, or where --nvme-path put it), which
stands for its store's directories.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys

import click

from infinity.config import format_size

_PATHS = click.Path(exists=True, file_okay=False)
_COLUMNS = ("key", "dtype", "shape", "size", "version")


def store_dirs(paths) -> list[str]:
    """The store directories PATHS name: a converted model's folder (a model.json and no
    manifest.json) stands for the directories its model.json lists, said once on stderr."""
    from infinity.inference.layout import LAYOUT_FILE, ModelLayout
    from infinity.store.manifest import MANIFEST

    out: list[str] = []
    for path in paths:
        is_model = os.path.lexists(os.path.join(path, LAYOUT_FILE))
        if not is_model or os.path.lexists(os.path.join(path, MANIFEST)):
            out.append(path)
            continue
        found = ModelLayout.load(path, allow_incomplete=True).store_paths
        click.echo(f"{path} is a converted model folder; its store is {' '.join(found)}", err=True)
        out += found
    return out


@click.group()
def store() -> None:
    """Inspect and maintain a store (a store's directories, or a converted model's folder)."""


def _directories(ctx, param, value):
    from infinity.cli import _directory  # at run time: cli.py imports this module

    return _directory(ctx, param, value)


def _paths_argument(fn):
    return click.argument("paths", nargs=-1, required=True, type=_PATHS, callback=_directories)(fn)


@store.command("ls")
@_paths_argument
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def store_ls(paths, as_json) -> None:
    """List the keys: dtype, shape, size, and version (how many times the key was written: 1
    for once, one more for each rewrite). Exit 1 if the manifest has damaged records."""
    from infinity.store import TieredStore

    dirs = store_dirs(paths)
    with TieredStore.open(dirs, readonly=True) as s:
        entries = [s.entry(key) for key in sorted(s.keys())]
        damaged = s.damaged()
        nvme_bytes = s.stats().nvme_bytes
    if as_json:
        rows = [
            {"key": e.key, "dtype": _dtype(e.dtype), "shape": list(e.shape), "nbytes": e.nbytes,
             "version": e.version}
            for e in entries
        ]  # fmt: skip
        doc = {"store": dirs, "keys": rows, "damaged": damaged, "nvme_bytes": nvme_bytes}
        click.echo(json.dumps(doc, indent=2))
        sys.exit(1 if damaged else 0)
    rows = [
        (e.key, _dtype(e.dtype), str(list(e.shape)), format_size(e.nbytes), str(e.version))
        for e in entries
    ]
    if rows:
        widths = [max(len(r[i]) for r in [_COLUMNS, *rows]) for i in range(len(_COLUMNS))]
        for row in [_COLUMNS, *rows]:
            cells = [
                c.rjust(w) if i >= 3 else c.ljust(w)  # size and version right-aligned
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            ]
            click.echo("  ".join(cells).rstrip())
    for key, problem in sorted(damaged.items()):
        click.echo(f"DAMAGED {key}: {problem}")
    click.echo(
        f"{len(entries)} keys, {format_size(nvme_bytes)}"
        + (f"; {len(damaged)} damaged records (infinity store fsck)" if damaged else "")
    )
    sys.exit(1 if damaged else 0)


@store.command("fsck")
@_paths_argument
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def store_fsck(paths, as_json) -> None:
    """Read every key back and check its checksum; exit 1 if any is damaged. A progress bar
    shows on a terminal (not with --json)."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    from infinity.store import TieredStore

    dirs = store_dirs(paths)
    console = Console(stderr=True)
    columns = (
        TextColumn("fsck"),
        BarColumn(),
        DownloadColumn(binary_units=True),
        TransferSpeedColumn(),
    )
    bar = Progress(*columns, TimeRemainingColumn(), console=console, transient=True)
    show = console.is_terminal and not as_json
    with TieredStore.open(dirs, readonly=True) as s:
        task = bar.add_task("fsck", total=None)
        with bar if show else contextlib.nullcontext():
            problems = s.fsck(lambda done, total: bar.update(task, completed=done, total=total))
        total = len(s) + len(s.damaged())
    if as_json:
        doc = {"store": dirs, "keys": total, "intact": total - len(problems), "damaged": problems}
        click.echo(json.dumps(doc, indent=2))
        sys.exit(1 if problems else 0)
    for key, problem in sorted(problems.items()):
        click.echo(f"DAMAGED {key}: {problem}")
    click.echo(f"{total - len(problems)} of {total} keys intact")
    sys.exit(1 if problems else 0)


@store.command("compact")
@_paths_argument
def store_compact(paths) -> None:
    """Give back the free space at the end of the data files."""
    from infinity.store import TieredStore

    dirs = store_dirs(paths)
    with TieredStore.open(dirs, readonly=True):
        pass  # a store must be there: opening it for writing would make one
    with TieredStore.open(dirs) as s:
        click.echo(f"released {format_size(s.compact())}")


def _dtype(dtype) -> str:
    return str(dtype).removeprefix("torch.")
