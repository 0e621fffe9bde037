"""DeepSpeed's aio op compiles on first use, for minutes (issue 18): the load says so once, with
why and where the build is kept, and shows that it is going on. A real compile takes minutes
here, so these tests check the decision (is the op built in the cache folder?) on a copy of the
real build folder, and the notice with a load that only pretends to compile."""

import contextlib
import io
import logging
import os
import shutil
import sys
import time

import pytest

from infinity.io import _deepspeed as ds
from infinity.io import load_aio


@pytest.fixture(scope="module")
def real_build() -> str:
    """The folder this machine's torch keeps its build of the aio op in (built if it was not)."""
    load_aio()
    from deepspeed.ops.op_builder import AsyncIOBuilder

    state = ds.build_state(AsyncIOBuilder())
    assert not state.needed, state  # just loaded: a second load compiles nothing
    assert os.path.exists(os.path.join(state.build_dir, "async_io.so"))
    return state.build_dir


@pytest.fixture
def builder():
    from deepspeed.ops.op_builder import AsyncIOBuilder

    return AsyncIOBuilder()


@pytest.fixture
def cache(tmp_path, monkeypatch, real_build) -> str:
    """TORCH_EXTENSIONS_DIR=tmp_path holding a copy of the real build folder's build.ninja and
    library; the folder it names."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    folder = tmp_path / "async_io"
    folder.mkdir()
    shutil.copyfile(os.path.join(real_build, "build.ninja"), folder / "build.ninja")
    shutil.copyfile(os.path.join(real_build, "async_io.so"), folder / "async_io.so")  # now: new
    return str(folder)


def test_extensions_root_is_where_torch_builds(real_build, monkeypatch, tmp_path):
    from torch.utils.cpp_extension import _get_build_directory

    assert os.path.join(ds.extensions_root(), "async_io") == real_build
    assert _get_build_directory("async_io", False) == real_build  # exists: nothing created
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert ds.extensions_root() == str(tmp_path)
    assert _get_build_directory("async_io", False) == str(tmp_path / "async_io")


def test_a_copy_of_the_real_build_needs_no_compile(cache, builder):
    assert ds.build_state(builder) == ds.OpBuild("async_io", cache, False)


def test_an_empty_cache_needs_a_compile(tmp_path, monkeypatch, builder):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "fresh"))
    state = ds.build_state(builder)
    folder = str(tmp_path / "fresh" / "async_io")
    assert state == ds.OpBuild("async_io", folder, True, f"no build of it in {folder} yet")
    assert not os.path.exists(folder)  # deciding creates nothing
    assert state.notice() == (
        "compiling DeepSpeed's async_io op, which infinity's disk reads and writes run on: no "
        f"build of it in {folder} yet. This takes minutes (4 to 9 on 2 cores), once: later runs "
        "load the build from there (TORCH_EXTENSIONS_DIR moves it)"
    )


def test_a_build_from_another_deepspeed_install_needs_a_compile(cache, builder):
    recipe = os.path.join(cache, "build.ninja")
    with open(recipe) as f:
        text = f.read()
    here = os.path.dirname(os.path.dirname(builder.deepspeed_src_path("csrc")))
    assert here in text
    with open(recipe, "w") as f:
        f.write(text.replace(here, "/elsewhere/site-packages/deepspeed/ops"))
    state = ds.build_state(builder)
    assert state.needed and state.reason == f"the build in {cache} is another DeepSpeed install's"


def test_a_build_older_than_the_sources_needs_a_compile(cache, builder):
    source = builder.deepspeed_src_path(builder.sources()[0])
    past = os.path.getmtime(source) - 3600
    os.utime(os.path.join(cache, "async_io.so"), (past, past))
    state = ds.build_state(builder)
    assert state.needed and "sources are newer than the build in" in state.reason, state


def test_no_library_in_the_folder_needs_a_compile(cache, builder):
    os.remove(os.path.join(cache, "async_io.so"))  # build.ninja alone: a compile cut short
    assert ds.build_state(builder).needed


def test_an_op_installed_with_deepspeed_compiles_nothing(tmp_path, monkeypatch, builder):
    import deepspeed.git_version_info as info

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setitem(info.installed_ops, "async_io", True)  # DS_BUILD_AIO=1 at install
    assert not ds.build_state(builder).needed


def test_an_op_this_accelerator_lacks_compiles_nothing(tmp_path, monkeypatch):
    """On a CPU-only machine DeepSpeed hands out a stand-in with no sources for the GDS op: its
    load fails at once, and must not be announced as minutes of compiling first."""
    from deepspeed.ops.op_builder.cpu.no_impl import NotImplementedBuilder

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert not ds.build_state(NotImplementedBuilder()).needed


@pytest.fixture
def slow_load(builder, monkeypatch):
    """The builder's load pretends to compile for 0.35 s; what it was called with."""
    calls = []

    def load(verbose=False):
        calls.append(verbose)
        time.sleep(0.35)
        return "the op"

    monkeypatch.setattr(builder, "load", load)
    monkeypatch.setattr(ds, "HEARTBEAT_S", 0.1)
    yield calls
    ds.set_build_progress(None)


def test_a_compile_is_said_once_then_a_line_while_it_runs(tmp_path, monkeypatch, builder,
                                                           slow_load, caplog):  # fmt: skip
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    with caplog.at_level(logging.INFO, logger=ds.__name__):
        assert ds._load_op(builder) == "the op"
    messages = [r.getMessage() for r in caplog.records]
    assert messages[0] == ds.build_state(builder).notice(), messages
    assert caplog.records[0].levelno == logging.WARNING  # shown by default, on stderr
    beats = [m for m in messages if m.startswith("still compiling DeepSpeed's async_io op: 0:00")]
    assert 2 <= len(beats) <= 4, messages
    assert messages[-1].startswith("compiled DeepSpeed's async_io op in "), messages
    assert slow_load == [False]


def test_a_cached_build_loads_without_a_word(cache, builder, slow_load, caplog):
    with caplog.at_level(logging.INFO, logger=ds.__name__):
        assert ds._load_op(builder) == "the op"
    assert caplog.records == [] and slow_load == [False]


def test_the_progress_shown_can_be_replaced(tmp_path, monkeypatch, builder, slow_load, caplog):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    events = []

    @contextlib.contextmanager
    def show(build):
        events.append(("start", build.name, len(slow_load)))
        yield
        events.append(("end", build.name, len(slow_load)))

    ds.set_build_progress(show)
    with caplog.at_level(logging.INFO, logger=ds.__name__):
        ds._load_op(builder)
    assert events == [("start", "async_io", 0), ("end", "async_io", 1)]  # around the load
    messages = [r.getMessage() for r in caplog.records]
    assert messages[0].startswith("compiling DeepSpeed's async_io op")  # said first either way
    assert not any(m.startswith("still compiling") for m in messages), messages


def test_the_libaio_probe_works_under_a_stderr_without_a_descriptor(builder, monkeypatch):
    """DeepSpeed redirects sys.stderr.fileno() around its probe compile: with pytest's capsys
    (or a notebook's stream) that raised inside it and read as "libaio not found"."""
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    with pytest.raises(io.UnsupportedOperation):
        sys.stderr.fileno()
    with ds._stderr_with_a_descriptor():
        assert builder.is_compatible(verbose=False)


def test_the_cli_draws_a_spinner_on_a_terminal(monkeypatch, capsys):
    from infinity.cli import _compile_spinner

    monkeypatch.setenv("TTY_COMPATIBLE", "1")  # rich takes capsys' stream for a terminal
    with _compile_spinner(ds.OpBuild("async_io", "/x/async_io", True, "why")):
        time.sleep(0.3)
    err = capsys.readouterr().err
    assert "compiling DeepSpeed's async_io op (once; a few minutes)" in err and "0:00:00" in err


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(
    "args, spinner",
    [
        (["store", "ls", "{dir}"], True),
        (["info", "--dir", "{dir}"], True),
        (["-q", "store", "ls", "{dir}"], False),
        (["estimate", "--params", "7B", "--gpu-budget", "80GB", "--host-budget", "1TB"], False),
    ],
    ids=["store", "info", "quiet", "estimate"],
)
def test_the_cli_shows_its_spinner_for_commands_that_load_the_op(
    monkeypatch, tmp_path, args, spinner
):
    import infinity.io
    from infinity.cli import _compile_spinner, main

    chosen = []
    monkeypatch.setattr(infinity.io, "set_build_progress", chosen.append)
    monkeypatch.setattr(sys, "stderr", _Terminal())
    monkeypatch.setattr(sys, "stdout", io.StringIO())
    with contextlib.suppress(SystemExit, Exception):
        main([a.format(dir=tmp_path) for a in args], standalone_mode=False)
    assert chosen == ([_compile_spinner] if spinner else [])
