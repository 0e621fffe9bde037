"""What a new user meets before any code runs (issue 18): the license, `infinity --version`, and
documentation that names no file outside the repository."""

import importlib.metadata
import os
import re
import subprocess

import pytest
from click.testing import CliRunner

import infinity
from infinity.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def test_version_option_prints_the_package_version():
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0 and result.output == f"infinity {infinity.__version__}\n"
    assert infinity.__version__ == _pyproject()["project"]["version"]
    assert importlib.metadata.version("infinity-store") == infinity.__version__


def test_license_is_apache_2_0_as_an_spdx_string():
    project = _pyproject()["project"]
    assert project["license"] == "Apache-2.0" and project["license-files"] == ["LICENSE"]
    assert not any(c.startswith("License ::") for c in project.get("classifiers", []))
    with open(os.path.join(ROOT, "LICENSE")) as f:
        text = f.read()
    assert "Apache License\n                           Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text and len(text.splitlines()) > 190  # in full


def _documents() -> list[str]:
    """Every Markdown file git tracks (README.md, CHANGELOG.md, docs/, bench/README.md)."""
    tracked = subprocess.run(
        ["git", "-C", ROOT, "ls-files", "*.md"], capture_output=True, text=True
    ).stdout.split()
    found = tracked or [
        os.path.relpath(os.path.join(d, n), ROOT)
        for d, _, names in os.walk(ROOT)
        if not {".git", ".venv", "build"} & set(os.path.relpath(d, ROOT).split(os.sep))
        for n in names
        if n.endswith(".md")
    ]
    return sorted(found)


# a developer's machine, not this repository: a parent directory, its home, a private folder
OUTSIDE = re.compile(r"(?<![\w.])\.\./|\.gpu/|/work/|/root/|/home/\w+")


def test_documents_name_no_path_outside_the_repository():
    docs = _documents()
    assert {"README.md", "CHANGELOG.md", "docs/ARCHITECTURE.md"} <= set(docs), docs
    bad = []
    for name in docs:
        with open(os.path.join(ROOT, name)) as f:
            for number, line in enumerate(f, 1):
                if OUTSIDE.search(line):
                    bad.append(f"{name}:{number}: {line.strip()}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize(
    "line, outside",
    [
        ("`source .gpu/gpu-env.sh && pytest`", True),
        ("see ../shared/STYLE.md", True),
        ("cd /work/main", True),
        ("`make test` in the checkout; docs/ARCHITECTURE.md", False),
        ("a Hub cache snapshot (.../models--X/snapshots/REV)", False),
        ("default `~/.cache/infinity`", False),
    ],
)
def test_the_outside_pattern(line, outside):
    assert bool(OUTSIDE.search(line)) == outside
