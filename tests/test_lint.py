"""The test command's ruff and mypy steps: they run, and their settings in pyproject.toml catch errors.

Each tool is run once on two small modules written here (one with errors, one clean), never on
the repository: the test command runs both on the whole tree before pytest.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tokenize
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = REPO / "pyproject.toml"

_RUFF_BAD = '''"""Lint errors the configured rules catch."""

import os


def check() -> bool:
    try:
        return True
    except Exception:
        return False


LONG = "{long}"
'''.format(long="x" * 142)  # 151 columns

_RUFF_GOOD = '''"""Clean: a used import, a blind except with its reason, a line of 150 columns."""

import os


def check() -> bool:
    try:
        return os.path.exists(".")
    except Exception:  # noqa: BLE001 - a reason
        return False


LONG = "{long}"
'''.format(long="x" * 141)  # 150 columns

_MYPY_BAD = '''"""Type errors the configured mypy catches."""


def first(names: list[str]) -> int:
    return names[0]


def untyped():
    count: int = "three"
    return count


value: int = 1  # type: ignore[assignment]
'''

_MYPY_GOOD = '''"""Clean."""


def first(names: list[str]) -> str:
    return names[0]


def untyped():
    count: int = 3
    return count
'''

_UNTYPED = '''"""A helper without annotations."""


def helper(x):
    return x
'''


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def _write(folder: Path, modules: dict[str, str]) -> list[str]:
    folder.mkdir()
    for name, text in modules.items():
        (folder / f"{name}.py").write_text(text)
    return [str(folder / f"{name}.py") for name in modules]


def test_ruff_config_catches_lint_errors(tmp_path: Path) -> None:
    bad, good = _write(tmp_path / "src", {"ruff_bad": _RUFF_BAD, "ruff_good": _RUFF_GOOD})
    r = _run(["ruff", "check", "--no-cache", "--output-format", "concise", "--config", str(PYPROJECT), bad, good], tmp_path)
    assert r.returncode == 1, r.stdout + r.stderr
    found = {(Path(m[0]).name, int(m[1]), m[2]) for m in re.findall(r"^(\S+\.py):(\d+):\d+: (\w+\d+)", r.stdout, re.M)}
    assert found == {
        ("ruff_bad.py", 3, "F401"),   # unused import
        ("ruff_bad.py", 9, "BLE001"),  # blind except without a reason
        ("ruff_bad.py", 13, "E501"),  # past the 150 columns the code keeps
    }, r.stdout


def test_mypy_config_catches_type_errors(tmp_path: Path) -> None:
    bad, good = _write(tmp_path / "src", {"mypy_bad": _MYPY_BAD, "mypy_good": _MYPY_GOOD})
    r = _run(["mypy", "--config-file", str(PYPROJECT), "--cache-dir", str(tmp_path / "cache"), bad, good], tmp_path)
    assert r.returncode == 1, r.stdout + r.stderr
    found = {(Path(m[0]).name, int(m[1]), m[2]) for m in re.findall(r"^(\S+\.py):(\d+): error: .*\[([\w-]+)\]$", r.stdout, re.M)}
    assert found == {
        ("mypy_bad.py", 5, "return-value"),
        ("mypy_bad.py", 9, "assignment"),  # inside an unannotated function: check_untyped_defs
        ("mypy_bad.py", 13, "unused-ignore"),  # warn_unused_ignores
    }, r.stdout


def test_mypy_requires_annotations_in_the_package_only(tmp_path: Path) -> None:
    """The node package annotates every function; a test or benchmark helper may go without."""
    src = tmp_path / "src"
    _write(src, {"helper": _UNTYPED})
    (src / "node").mkdir()
    (src / "node" / "__init__.py").write_text("")
    (src / "node" / "probe.py").write_text(_UNTYPED)
    r = _run(["mypy", "--config-file", str(PYPROJECT), "--cache-dir", str(tmp_path / "cache"),
              str(src / "helper.py"), str(src / "node" / "probe.py")], tmp_path)
    assert r.returncode == 1, r.stdout + r.stderr
    found = {(Path(m[0]).name, int(m[1]), m[2]) for m in re.findall(r"^(\S+\.py):(\d+): error: .*\[([\w-]+)\]$", r.stdout, re.M)}
    assert found == {("probe.py", 4, "no-untyped-def")}, r.stdout


#: a suppression comment: ``type: ignore[codes]`` or ``noqa: CODES``, then what follows it on the line
_SUPPRESSION = re.compile(r"#\s*(?:type:\s*ignore\[[^\]]*\]|noqa:\s*[A-Z]+[0-9]+(?:\s*,\s*[A-Z]+[0-9]+)*)(?P<rest>.*)$")


def test_every_type_ignore_and_noqa_says_why() -> None:
    """A suppression names its codes (ruff's PGH rules) and gives its reason on the same line:
    ``# type: ignore[code]  # why`` or ``# noqa: CODE - why``."""
    bare = []
    for tree in ("node", "tests", "bench", "scripts"):
        for path in sorted((REPO / tree).rglob("*.py")):
            if any(part.startswith(".") for part in path.relative_to(REPO).parts):
                continue
            with tokenize.open(path) as f:
                comments = [(t.start[0], t.string) for t in tokenize.generate_tokens(f.readline) if t.type == tokenize.COMMENT]
            for line, text in comments:  # comments only: a suppression quoted in a string is test data
                m = _SUPPRESSION.search(text)
                if m and not re.match(r"\s*(?:-|#)\s*\w", m.group("rest")):
                    bare.append(f"{path.relative_to(REPO)}:{line}: {text}")
    assert bare == [], "\n".join(bare)


def test_tools_check_the_project_trees() -> None:
    conf = tomllib.loads(PYPROJECT.read_text())
    assert set(conf["tool"]["mypy"]["files"]) >= {"node", "tests", "bench", "scripts"}
    include = conf["tool"]["ruff"]["include"]
    for tree in ("node", "tests", "bench", "scripts"):
        assert f"{tree}/**/*.py" in include
    assert "ignore_missing_imports" not in conf["tool"]["mypy"]  # only per module, for packages without types


def test_readme_and_ci_run_the_same_command_with_both_tools() -> None:
    blocks = re.findall(r"```sh\n(.*?)\n```", (REPO / "README.md").read_text(), re.S)
    command = blocks[1].strip()  # the second command: install everything and run the whole test suite
    ci = (REPO / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci == command
    steps = [s.strip() for s in command.split("&&")]
    assert steps[1:] == [".venv/bin/ruff check", ".venv/bin/mypy", ".venv/bin/python -m pytest -q"]
