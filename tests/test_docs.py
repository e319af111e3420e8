"""The documentation: the site builds offline with warnings as errors, every code block that says it runs does, every
public name has a docstring with an example, the README stays a front page, and the command line documents itself."""

from __future__ import annotations

import doctest
import importlib
import inspect
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PUBLIC_MODULES = ["peft_isaerft", "peft_isaerft.interpret", "peft_isaerft.audit", "peft_isaerft.sparsity",
                  "peft_isaerft.components", "peft_isaerft.active_latents", "peft_isaerft.demo", "peft_isaerft.guards",
                  "peft_isaerft.portable"]
RUNS = re.compile(r"<!-- runs -->\s*\n```python\n(.*?)```", re.DOTALL)


def _pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def test_site_builds_offline_with_warnings_as_errors(tmp_path) -> None:
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    reference = (tmp_path / "site" / "reference" / "index.html").read_text()
    for name in ("ISaeRFTConfig", "feature_report", "run_audit", "selector_for", "sparse_code"):
        assert name in reference


@pytest.mark.parametrize("page", [p for p in _pages() if RUNS.search(p.read_text())], ids=lambda p: p.name)
def test_code_blocks_that_say_they_run_do(page, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for number, code in enumerate(RUNS.findall(page.read_text())):
        exec(compile(code, f"{page.relative_to(ROOT)} block {number}", "exec"), namespace)
    assert capsys.readouterr().out.strip()  # each such page prints something a reader is told to expect


def _public_names() -> list[tuple[str, str, object]]:
    names = []
    for module_name in PUBLIC_MODULES:
        module = importlib.import_module(module_name)
        for name in module.__all__:
            value = getattr(module, name)
            if inspect.isclass(value) or inspect.isfunction(value):
                names.append((module_name, name, value))
    return names


@pytest.mark.parametrize(("module", "name", "value"), _public_names(), ids=lambda v: v if isinstance(v, str) else "")
def test_every_public_name_has_a_docstring_with_an_example(module, name, value) -> None:
    doc = inspect.getdoc(value) or ""
    assert "Example" in doc, f"{module}.{name} has no example in its docstring"
    assert name in (ROOT / "docs" / "reference.md").read_text(), f"{module}.{name} is not in the API reference"


def test_docstring_examples_that_are_not_skipped_pass() -> None:
    finder, runner = doctest.DocTestFinder(), doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    for module_name in [*PUBLIC_MODULES, "peft_isaerft.saes", "peft_isaerft.interpret.labels", "peft_isaerft.cli"]:
        module = importlib.import_module(module_name)
        for test in finder.find(module):
            test.globs.update({"torch": importlib.import_module("torch")})
            runner.run(test)
    assert runner.failures == 0 and runner.tries > 5


def test_readme_is_a_front_page() -> None:
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 150
    for link in re.findall(r"\]\((docs/[^)#]+)", readme):
        assert (ROOT / link).is_file(), link


def test_command_line_lists_its_commands_and_their_examples() -> None:
    isaerft = shutil.which("isaerft")
    command = [isaerft] if isaerft else [sys.executable, "-m", "peft_isaerft.cli"]
    from peft_isaerft import __version__

    version = subprocess.run([*command, "--version"], capture_output=True, text=True, timeout=120)
    assert version.returncode == 0 and version.stdout.strip() == f"isaerft {__version__}"
    overview = subprocess.run([*command, "--help"], capture_output=True, text=True, timeout=120).stdout
    for sub in ("report", "diff", "audit", "demo"):
        assert re.search(rf"^\s+{sub}\s+\S", overview, re.M), f"--help does not list {sub} with a summary"
        help_text = subprocess.run([*command, sub, "--help"], capture_output=True, text=True, timeout=120).stdout
        assert f"example:\n  isaerft {sub}" in help_text
