"""The `infinity` command: parse, call the library, print. Nothing else lives here."""

from __future__ import annotations

import json
import logging
import os
import sys

import click

from infinity import __version__
from infinity.config import format_size, parse_size
from infinity.errors import InfinityError


def _size(ctx, param, value):
    if value is None:
        return None
    try:
        return parse_size(value)
    except InfinityError as exc:
        raise click.BadParameter(str(exc)) from None


def _directory(ctx, param, value):
    """click.Path(file_okay=False) refuses a regular file only: a FIFO, a device or a socket
    given as a directory is refused here, as a usage error (the commands would fail later)."""
    from infinity.files import NotRegularFileError

    for path in value if isinstance(value, tuple) else (value,):
        if path is not None and os.path.lexists(path) and not os.path.isdir(path):
            kind = NotRegularFileError(path, os.stat(path).st_mode).kind
            raise click.BadParameter(f"{path!r} is {kind}, not a directory")
    return value


def _output_file(ctx, param, value):
    """A file to write at the end of a long run: refused at once when it could not be written
    then (its directory missing or not writable, the path a FIFO or a device)."""
    if value is None:
        return None
    parent = os.path.dirname(os.path.abspath(value))
    if not os.path.isdir(parent):
        raise click.BadParameter(f"{value!r}: its directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise click.BadParameter(f"{value!r}: its directory {parent} is not writable")
    if os.path.lexists(value) and not os.path.isfile(value):
        raise click.BadParameter(f"{value!r} exists and is not a regular file")
    return value


@click.group()
@click.version_option(__version__, prog_name="infinity", message="%(prog)s %(version)s")
@click.option("-v", "--verbose", count=True, help="More logging (-vv for debug).")
@click.option("-q", "--quiet", is_flag=True, help="Only errors.")
def main(verbose: int, quiet: bool) -> None:
    """infinity: tiered tensor storage (GPU / pinned CPU / NVMe) on DeepSpeed's async I/O."""
    level = (
        logging.ERROR if quiet else (logging.WARNING, logging.INFO, logging.DEBUG)[min(verbose, 2)]
    )
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    ctx = click.get_current_context()
    if ctx.invoked_subcommand in _LOADS_AIO and not quiet and sys.stderr.isatty():
        from infinity.io import set_build_progress

        set_build_progress(_compile_spinner)  # instead of a log line every 30 s


# commands that may load DeepSpeed's aio op, which compiles on first use (they load torch anyway;
# the others stay quick to start)
_LOADS_AIO = {"info", "bench", "store", "convert", "generate"}


def _compile_spinner(build):
    """A spinner with the elapsed time on stderr while DeepSpeed compiles an op (after the
    WARNING that says what and why); it goes away when the compile ends."""
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    text = TextColumn(f"compiling DeepSpeed's {build.name} op (once; a few minutes)")
    columns = (SpinnerColumn(), text, TimeElapsedColumn())
    bar = Progress(*columns, console=Console(stderr=True), transient=True)
    bar.add_task("compile", total=None)
    return bar


@main.command()
@click.option(
    "--dir",
    "directory",
    type=click.Path(exists=True, file_okay=False),
    callback=_directory,
    help="Directory you plan to offload to (filesystem, O_DIRECT, device queue).",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def info(directory: str | None, as_json: bool) -> None:
    """What this machine offers for offloading: GPUs and PCIe, versions, aio/GDS, disk, RAM."""
    from infinity.info import collect

    data = collect(directory)
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    click.echo(
        f"torch {data['torch']} (CUDA {data['torch_cuda']}), DeepSpeed {data['deepspeed']}, "
        f"Python {data['python']}"
    )
    for gpu in data["gpus"] or [None]:
        if gpu is None:
            click.echo("GPU: none visible to torch")
            continue
        link = gpu.get("pcie", {})
        click.echo(
            f"GPU {gpu['index']}: {gpu['name']}, {format_size(gpu['memory_bytes'])}, "
            f"sm {gpu['capability']}, PCIe {link.get('current_link_speed')} "
            f"x{link.get('current_link_width')} (max {link.get('max_link_speed')} "
            f"x{link.get('max_link_width')})"
        )
    aio = data["aio"]
    click.echo("DeepSpeed aio op: " + ("loads" if aio["loads"] else f"UNAVAILABLE: {aio['error']}"))
    click.echo("DeepSpeed GDS op: " + ("loads" if data["gds"]["loads"] else "unavailable"))
    host = data["host"]
    memlock = host["memlock_limit_bytes"]
    click.echo(
        f"RAM: {format_size(host['ram_total_bytes'])} total, "
        f"{format_size(host['ram_available_bytes'])} available; memlock limit "
        f"{'unlimited' if memlock is None else format_size(memlock)}; pinned headroom "
        f"{format_size(host['pinned_headroom_bytes'])} (CUDA-registered), "
        f"{format_size(host['locked_headroom_bytes'])} (mlock)"
    )
    if "dir" in data:
        d = data["dir"]
        direct = "yes" if d["direct_io"] else f"NO ({d['direct_io_error']})"
        click.echo(
            f"{d['path']}: {d['fs_type']} on {d['device']} (mounted at {d['mount_point']}), "
            f"{format_size(d['free_bytes'])} free of {format_size(d['total_bytes'])}, "
            f"O_DIRECT {direct}"
        )
        if d["memory_backed"]:
            click.echo(
                f"  WARNING: {d['fs_type']} is memory, not a disk: offloading there costs RAM"
            )
        if d["block_device"]:
            q = " ".join(f"{k}={v}" for k, v in d["queue"].items())
            click.echo(f"  block device {d['block_device']}: {q}")


@main.group()
def bench() -> None:
    """Benchmarks."""


@bench.command("io")
@click.option(
    "--dir",
    "directory",
    required=True,
    type=click.Path(exists=True, file_okay=False),
    callback=_directory,
    help="Directory on the drive to measure (a temporary file is written there).",
)
@click.option(
    "--size",
    "size_bytes",
    default="4GiB",
    callback=_size,
    show_default=True,
    help="Bytes per transfer.",
)
@click.option("--gpu", is_flag=True, help="Also read into GPU memory.")
@click.option("--quick", is_flag=True, help="A small sweep (2 configurations).")
@click.option("--full", is_flag=True, help="A large sweep (120 configurations).")
@click.option(
    "--repeats",
    default=3,
    show_default=True,
    help="Timed repeats per point: the median is reported, with the slowest and fastest run.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option(
    "-o",
    "--output",
    "output_path",
    type=click.Path(dir_okay=False),
    callback=_output_file,
    help="Also write the results, with the machine, as JSON to this file.",
)
def bench_io(directory, size_bytes, gpu, quick, full, repeats, as_json, output_path) -> None:
    """Sweep block size x queue depth x threads x submit mode; reads and writes, cold."""
    from rich.console import Console
    from rich.table import Table

    from infinity import iobench

    if quick and full:
        raise click.UsageError("--quick and --full exclude each other")
    console = Console(stderr=True)
    grid = "quick" if quick else "full" if full else "default"
    with console.status("measuring...") as status:
        data = iobench.run(
            directory,
            size_bytes,
            gpu=gpu,
            grid=grid,
            repeats=repeats,
            progress=lambda msg: (console.print(msg, highlight=False), status.update(msg)),
            output_path=output_path,
        )
    if as_json or output_path:
        from infinity.info import collect

        data["machine"] = collect(directory, check_aio=False)
    if output_path:
        with open(output_path, "w") as f:
            json.dump(data, f, indent=2)
    if as_json:
        click.echo(json.dumps(data, indent=2))
    elif sys.stdout.isatty():
        title = f"infinity bench io: {format_size(data['size_bytes'])}, cold, O_DIRECT"
        table = Table(title=title + f", median of {data['repeats']}")
        for col in iobench.TABLE_COLUMNS:
            right = col in ("GB/s", "min-max", "x best read")
            table.add_column(col, justify="right" if right else "left", no_wrap=True)
        for row in iobench.table_rows(data):
            table.add_row(*row)
        Console().print(table)
    else:  # piped: plain columns, never cut to a terminal's width
        click.echo(iobench.plain_table(data))
    if not as_json:
        click.echo("Best read settings (best median) as DeepSpeed's aio config section:")
        click.echo(json.dumps({"aio": data["deepspeed_aio_section"]}, indent=2))
        if "gpu_over_pinned" in data:
            click.echo(f"GPU reads reach {data['gpu_over_pinned']:.1%} of reads into pinned memory")
    if output_path:
        click.echo(f"wrote {output_path}", err=as_json)


def _params(ctx, param, value):
    from infinity.estimate import parse_params

    if value is None:
        return None
    try:
        return parse_params(value)
    except InfinityError as exc:
        raise click.BadParameter(str(exc)) from None


def _gb(nbytes: int) -> str:
    return f"{nbytes / 1e9:,.2f} GB"


@main.command()
@click.option("--params", callback=_params, help="Parameter count: 125M, 7B, 1.5T or 70e9.")
@click.option(
    "--model",
    "model_path",
    type=click.Path(exists=True, dir_okay=False),
    help="Hugging Face config.json (Llama/Mistral/Qwen2-style shapes).",
)
@click.option("--gpus", default=1, show_default=True, help="GPUs in total.")
@click.option("--nodes", default=1, show_default=True, help="Nodes (host/NVMe bytes are per node).")
@click.option("--stage", type=click.Choice(["0", "1", "2", "3"]), help="Only this ZeRO stage.")
@click.option("--offload", type=click.Choice(["none", "cpu", "nvme"]), help="Only this offload.")
@click.option("--batch", type=int, help="Micro batch per GPU (with --seq: activations, KV cache).")
@click.option("--seq", type=int, help="Sequence length.")
@click.option("--flash-attention", is_flag=True, help="Attention scores are not stored.")
@click.option(
    "--dtype",
    default="bf16",
    show_default=True,
    type=click.Choice(["fp32", "bf16", "fp16", "int8", "int4"]),
    help="Inference weights.",
)
@click.option(
    "--gpu-budget",
    callback=_size,
    help="Memory of one GPU, to check what fits (inference: also the resident layers) "
    "[default: this machine's GPU].",
)
@click.option(
    "--host-budget",
    callback=_size,
    help="Host memory of one node, to check what fits (inference from NVMe: also the cached "
    "layers) [default: this machine's RAM].",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def estimate(
    params,
    model_path,
    gpus,
    nodes,
    stage,
    offload,
    batch,
    seq,
    flash_attention,
    dtype,
    gpu_budget,
    host_budget,
    as_json,
) -> None:
    """Whether a model fits for training (data parallelism, ZeRO-1/2/3, offload) and streamed
    inference: the answer first, then the bytes per GPU, host and NVMe with their formulas."""
    from infinity.estimate import ModelSpec, answer
    from infinity.estimate import estimate as run_estimate

    if (params is None) == (model_path is None):
        raise click.UsageError("give exactly one of --params and --model")
    spec = (
        ModelSpec.from_params(params)
        if model_path is None
        else ModelSpec.from_hf_config(model_path)
    )
    result = run_estimate(
        spec,
        gpus=gpus,
        nodes=nodes,
        stages=(int(stage),) if stage else (0, 1, 2, 3),
        offload=offload,
        batch=batch,
        seq=seq,
        flash_attention=flash_attention,
        dtype=dtype,
        gpu_budget_bytes=gpu_budget,
        host_budget_bytes=host_budget,
    )
    budgets = _budgets(gpu_budget, host_budget)
    fits = answer(result, budgets["gpu_bytes"], budgets["host_bytes"])
    if as_json:
        doc = result.to_dict() | {"budgets": budgets, "answer": [f.to_dict() for f in fits]}
        click.echo(json.dumps(doc, indent=2))
        return
    for fit in fits:
        click.echo(_fit_line(fit, gpus, nodes, budgets))
    click.echo(
        f"model: {spec.params:,} parameters ({spec.source}); {gpus} GPU(s) over {nodes} node(s); "
        "GPU bytes per GPU, host and NVMe bytes per node; GB = 1e9 bytes"
        + ("" if result.activations else "; activations not counted (--batch and --seq)")
    )
    click.echo(_budget_line(budgets))
    _estimate_table(result, budgets)
    for note in result.notes:
        click.echo(f"note: {note}")


def _budgets(gpu_bytes: int | None, host_bytes: int | None) -> dict:
    """The budgets to check against: as given, else this machine's (its smallest GPU, its RAM
    or its memory cgroup's limit if lower); None where there is none."""
    out = {"gpu_bytes": gpu_bytes, "gpu_from": "--gpu-budget"}
    out |= {"host_bytes": host_bytes, "host_from": "--host-budget"}
    if gpu_bytes is None or host_bytes is None:
        from infinity import info

        if gpu_bytes is None:
            found = [g["memory_bytes"] for g in info.gpus()]
            out |= {"gpu_bytes": min(found, default=None), "gpu_from": "this machine"}
        if host_bytes is None:
            host = info.host()
            limit = host["cgroup_memory_limit_bytes"]
            ram = host["ram_total_bytes"] if limit is None else min(limit, host["ram_total_bytes"])
            out |= {"host_bytes": ram, "host_from": "this machine"}
    return out


def _budget_line(budgets: dict) -> str:
    gpu, host = budgets["gpu_bytes"], budgets["host_bytes"]
    shown = [
        f"GPU {_gb(gpu)} ({budgets['gpu_from']})"
        if gpu is not None
        else "no GPU (none on this machine: give --gpu-budget, e.g. 80GB)",
        f"host {_gb(host)} ({budgets['host_from']})",
    ]
    return "checked against: " + ", ".join(shown)


def _fit_line(fit, gpus: int, nodes: int, budgets: dict) -> str:
    """One line: fits / does not fit / what it needs, with which scenario."""
    gpu, host = budgets["gpu_bytes"], budgets["host_bytes"]

    def need(device: str, nbytes: int, unit: str) -> str:
        return f"{_gb(nbytes)} {unit}" + (" (over)" if device in fit.over else "")

    needs = [need("gpu", fit.gpu_bytes, "per GPU")]
    needs += [need("host", fit.host_bytes, "host")] if fit.host_bytes else []
    needs += [f"{_gb(fit.nvme_bytes)} NVMe"] if fit.nvme_bytes else []
    how = fit.scenario.removeprefix("inference, ").removeprefix("inference ")
    how += f" + activations ({fit.activations})" if fit.activations else ""
    what = fit.kind.capitalize()
    needs = ", ".join([how, *needs])
    if fit.fits is None:
        return f"{what} needs at least: {needs}"
    machine = f"{gpus} GPU{'s' if gpus > 1 else ''} of {_gb(gpu)} and {_gb(host)} of host memory"
    machine += f" per node ({nodes} nodes)" if nodes > 1 else ""
    if fit.fits:
        return f"{what} fits {machine}: {needs}"
    return f"{what} does not fit {machine}; at the least: {needs}"


def _estimate_table(result, budgets: dict) -> None:
    """The terms of every scenario with their formulas: at the terminal's width (long cells
    wrap), or when piped as wide as the table needs (nothing cut, nothing wrapped)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(show_lines=False)
    for col in ("term", "where", "formula", "bytes"):
        table.add_column(col, justify="right" if col == "bytes" else "left", overflow="fold")
    for sc in result.scenarios:
        table.add_section()
        table.add_row(f"[bold]{sc.name}[/bold]", "", "", "")
        for t in sc.terms:
            table.add_row(t.name, t.device, t.formula, _gb(t.nbytes))
        totals = ", ".join(
            f"{d} {_gb(sc.total(d))}" for d in ("gpu", "host", "nvme") if sc.total(d)
        )
        over = [
            d
            for d in ("gpu", "host")
            if budgets[f"{d}_bytes"] is not None and sc.total(d) > budgets[f"{d}_bytes"]
        ]
        verdict = f"over: {', '.join(over)}" if over else "fits"
        if budgets["gpu_bytes"] is None and not over:
            verdict = ""
        table.add_row("[bold]total[/bold]", "", verdict, totals or "0")
        if sc.kind == "training" and result.activations:
            for mode in result.activations:
                with_act = sc.total("gpu") + result.activation_bytes(mode)
                table.add_row(f"  GPU with activations, {mode}", "gpu", "", _gb(with_act))
    for mode, terms in result.activations.items():
        table.add_section()
        table.add_row(f"[bold]activations per GPU, {mode}[/bold]", "", "", "")
        for t in terms:
            table.add_row(t.name, t.device, t.formula, _gb(t.nbytes))
    console = Console()
    if not console.is_terminal:
        console = Console(width=Console(width=100_000).measure(table).maximum)
    console.print(table)


@main.command()
@click.argument("config_path", type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--model",
    "model_path",
    type=click.Path(exists=True, dir_okay=False),
    help="Hugging Face config.json, for the size-dependent checks.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def lint(config_path, model_path, as_json) -> None:
    """Check a DeepSpeed config (JSON/HJSON); exit 0 clean, 1 warnings, 2 errors."""
    from infinity.lint import exit_code
    from infinity.lint import lint as run_lint

    findings = run_lint(config_path, model_path)
    if as_json:
        click.echo(json.dumps([f.to_dict() for f in findings], indent=2))
    else:
        for f in findings:
            click.echo(f"{f.level}: {f.path}: {f.message}\n  fix: {f.fix}")
        errors = sum(f.level == "error" for f in findings)
        click.echo(f"{config_path}: {errors} error(s), {len(findings) - errors} warning(s)")
    sys.exit(exit_code(findings))


@main.command("convert")
@click.argument("hf_dir", type=click.Path(file_okay=False), callback=_directory)
@click.argument("store_dir", type=click.Path(file_okay=False), callback=_directory)
@click.option(
    "--dtype",
    default="auto",
    show_default=True,
    type=click.Choice(["auto", "fp32", "bf16", "fp16", "fp8"]),
    help="auto keeps the checkpoint's; fp8: layer matrices float8_e4m3fn + per-row scales.",
)
@click.option(
    "--nvme-path",
    "nvme_paths",
    multiple=True,
    type=click.Path(file_okay=False),
    callback=_directory,
    help="Where the store's data goes (repeat to stripe over drives). Default: STORE_DIR/data.",
)
@click.option("--overwrite", is_flag=True, help="Discard an earlier conversion in STORE_DIR.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def convert_cmd(hf_dir, store_dir, dtype, nvme_paths, overwrite, as_json) -> None:
    """Convert a Hugging Face safetensors checkpoint into a store (resumes if interrupted)."""
    import time

    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    from infinity.inference import convert

    written, started = [], []
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn())
    bar = Progress(*columns, TransferSpeedColumn(), console=Console(stderr=True), transient=True)
    start = time.perf_counter()
    task = bar.add_task("converting", total=None)

    def progress(done: int, total: int, unit: str) -> None:
        if not unit:  # writing starts: the bar shows from here (a refusal prints one line)
            bar.start()
        (written if unit else started).append((unit, time.perf_counter()))
        bar.update(task, completed=done, total=total, description=unit or "writing")

    try:
        layout = convert(
            hf_dir, store_dir, dtype, list(nvme_paths) or None, progress, overwrite=overwrite
        )
    finally:
        if started:  # stop() prints a newline even when the bar never started
            bar.stop()
    seconds = time.perf_counter() - start
    sizes = {u.name: u.nbytes for u in layout.units}
    written_bytes = sum(sizes[name] for name, _ in written)
    write_s = written[-1][1] - started[0][1] if written else 0.0
    summary = {
        "store_dir": store_dir,
        "architecture": layout.architecture,
        "dtype": layout.dtype,
        "compute_dtype": layout.compute_dtype,
        "units": len(layout.units),
        "layers": sum(u.layer is not None for u in layout.units),
        "tensors": len(layout.tensors),
        "stored_bytes": sum(sizes.values()),
        "written_bytes": written_bytes,
        "units_written": len(written),
        "seconds": round(seconds, 3),
        "write_seconds": round(write_s, 3),
        "write_gbps": round(written_bytes / write_s / 1e9, 3) if write_s else 0.0,
    }
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    click.echo(
        f"{store_dir}: {summary['architecture']}, {summary['units']} units "
        f"({summary['layers']} layers), {summary['tensors']} tensors, "
        f"{_gb(summary['stored_bytes'])} as {layout.dtype} (computes in {layout.compute_dtype})"
    )
    if not written:
        click.echo("already converted: nothing written")
        return
    resumed = len(layout.units) - len(written)
    click.echo(
        f"wrote {_gb(written_bytes)} in {write_s:.1f} s ({summary['write_gbps']:.2f} GB/s); "
        f"{seconds:.1f} s in all (reading the checkpoint's layout, opening the store)"
        + (f"; resumed: {resumed} units were already stored" if resumed else "")
    )


@main.command("generate")
@click.argument("store_dir", metavar="SOURCE")
@click.option(
    "--prompt",
    "prompts",
    required=True,
    multiple=True,
    help="The prompt; repeat it for a batch of different prompts.",
)
@click.option(
    "--tokenizer",
    "tokenizer_dir",
    metavar="DIR",
    help="Folder with the tokenizer files (or a Hub cache models--ORG--NAME folder) "
    "[default: the store's, else the checkpoint's it was converted from].",
)
@click.option("--max-new-tokens", default=32, show_default=True, type=click.IntRange(1))
@click.option(
    "--batch-size",
    default=1,
    show_default=True,
    type=click.IntRange(1),
    help="Copies of each prompt.",
)
@click.option(
    "--temperature",
    type=click.FloatRange(0),
    help="0 or unset: greedy (the most likely token each step); above 0: sampled.",
)
@click.option(
    "--top-p",
    type=click.FloatRange(0, 1, min_open=True),
    help="Sample from the smallest set of tokens this likely [default: the model's "
    "generation_config, else 1.0].",
)
@click.option(
    "--top-k",
    type=click.IntRange(1),
    help="Sample from this many most likely tokens [default: the model's generation_config, "
    "else 50].",
)
@click.option("--seed", type=click.IntRange(0), help="Makes sampling repeatable.")
@click.option(
    "--chat/--no-chat",
    default=None,
    help="Wrap each prompt in the tokenizer's chat template as a user message "
    "[default: on when the tokenizer has a chat template].",
)
@click.option(
    "--ignore-eos",
    is_flag=True,
    help="Always --max-new-tokens tokens (end of sequence suppressed; for timing).",
)
@click.option("--device", default=None, help="cuda, cuda:N or cpu [default: cuda if present]")
@click.option("--gpu-bytes", callback=_size, help="Device memory for weights [half the free].")
@click.option("--pinned-bytes", callback=_size, help="Pinned RAM for weights [model, <= RAM/2].")
@click.option(
    "--granularity",
    default="layer",
    show_default=True,
    type=click.Choice(["layer", "matrix"]),
    help="Stream whole layers, or each weight matrix alone (less GPU memory).",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def generate_cmd(store_dir, prompts, tokenizer_dir, max_new_tokens, batch_size, temperature,
                 top_p, top_k, seed, chat, ignore_eos, device, gpu_bytes, pinned_bytes,
                 granularity, as_json) -> None:  # fmt: skip
    """Generate text with a model streamed from SOURCE; report where time went.

    SOURCE: a converted store, a Hugging Face checkpoint folder or a Hub model id (from the
    local cache when offline); a checkpoint is converted on first use into INFINITY_CACHE
    (default ~/.cache/infinity), as infinity.inference.load does.

    Stops at the model's end-of-sequence token(s) or after --max-new-tokens. A single
    sequence is printed as its tokens come."""
    import torch

    from infinity.inference.generate import check_arguments, generate, tokenizer_for
    from infinity.inference.resolve import resolve_store

    check_arguments(prompts, max_new_tokens, batch_size, temperature, top_p, top_k, seed)
    store_dir = resolve_store(store_dir)
    tokenizer = tokenizer_for(store_dir, tokenizer_dir)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    streamer = None
    if not as_json and len(prompts) * batch_size == 1:
        chat_on = bool(getattr(tokenizer, "chat_template", None)) if chat is None else chat
        streamer = _echo_streamer(tokenizer, "" if chat_on else prompts[0])
    result = generate(
        store_dir, list(prompts), max_new_tokens, batch_size, device=device,
        tokenizer=tokenizer, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
        chat=chat, ignore_eos=ignore_eos, streamer=streamer, gpu_bytes=gpu_bytes,
        pinned_bytes=pinned_bytes, granularity=granularity,
    )  # fmt: skip
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2, default=str))
        return
    if streamer is None:
        chat_on = result.settings["chat"]
        for i, text in enumerate(result.texts):
            click.echo(f"[{i}] {'' if chat_on else prompts[i // batch_size]}{text}")
    _generate_summary(result)


def _echo_streamer(tokenizer, prompt: str):
    """transformers' TextStreamer that prints ``prompt`` when generation starts, then the new
    text as it comes (special tokens left out), then a newline."""
    from transformers import TextStreamer

    class Echo(TextStreamer):
        def put(self, value) -> None:
            if self.next_tokens_are_prompt and prompt:
                click.echo(prompt, nl=False)
            super().put(value)

    return Echo(tokenizer, skip_prompt=True, skip_special_tokens=True)


def _generate_summary(result) -> None:
    tokens, n = result.tokens, result.batch_size
    eos = result.stopped.count("eos")
    count = (
        f"{n} x {tokens[0]} new tokens"
        if len(set(tokens)) == 1
        else f"{sum(tokens)} new tokens ({n} sequences, {min(tokens)} to {max(tokens)} each)"
    )
    stopped = ""
    if eos:
        stopped = "; stopped at end of sequence" + (f": {eos} of {n}" if n > 1 else "")
    click.echo(
        f"{count} in {result.total_s:.2f} s: {result.tokens_per_s:.2f} tokens/s "
        f"({result.decode_tokens_per_s:.2f} after the first; first token "
        f"{result.first_token_s:.2f} s){stopped}"
    )
    st = result.settings
    how = (
        f"sampled: temperature {st['temperature']:g}, top-p {st['top_p']:g}, top-k {st['top_k']}"
        + (f", seed {st['seed']}" if st["seed"] is not None else "")
        if st["do_sample"]
        else "greedy"
    )
    click.echo(how + ("; chat template applied" if st["chat"] else ""))
    s = result.stats
    click.echo(
        f"time: waiting for weights {s['stall_s']:.2f} s, the rest computing; disk "
        f"{_gb(s['disk_bytes'])} in {s['disk_s']:.2f} s of reads, host->GPU {_gb(s['h2d_bytes'])}"
        f" over {s['copies']} copies ({s['copy_s']:.2f} s); {s['steps']} steps; {s['plan']}"
    )
    if "peak_gpu_bytes" in s:
        click.echo(f"peak GPU memory allocated: {_gb(s['peak_gpu_bytes'])}")


from infinity.cli_store import store  # noqa: E402 - the `store` group, in its own file

main.add_command(store)


def run() -> None:
    try:
        main(standalone_mode=True)
    except InfinityError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    run()
