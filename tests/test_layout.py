"""The package layout (issue 14): the command line in kcache/cli/ (the only importer of typer, one
command table), benchmarks in kcache/bench/, methods beside DIEKÆ in kcache/methods/, and the old
module paths still importable with a DeprecationWarning."""

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Modules outside kcache/cli/ that still import typer, each with the reason. kcache/remote.py keeps
# its old register(app) (the `pull` command itself is kcache.cli.cache.pull_cmd) until it is deleted.
TYPER_OUTSIDE_CLI: set[str] = set()


def test_typer_is_imported_only_by_the_cli_package():
    found = set()
    for path in (ROOT / "kcache").rglob("*.py"):
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith("kcache/cli/"):
            continue
        if re.search(r"^\s*(import typer|from typer\b)", path.read_text(), re.M):
            found.add(rel)
    assert found <= TYPER_OUTSIDE_CLI, f"typer imported outside kcache/cli/: {sorted(found - TYPER_OUTSIDE_CLI)}"


def test_the_command_table_is_the_app():
    import typer

    from kcache.cli import COMMANDS, Group, app

    root = typer.main.get_command(app)
    assert list(root.commands) == list(COMMANDS)
    for name, entry in COMMANDS.items():
        if isinstance(entry, Group):
            assert list(root.commands[name].commands) == list(entry.commands)
            assert root.commands[name].help == entry.help
        else:
            assert getattr(root.commands[name].callback, "__wrapped__", None) is entry  # typer wraps the function


# old module -> (new module, a name that must be the same object through both)
MOVED = {
    "kcache.cli_errors": ("kcache.cli.errors", "errors"),
    "kcache.cli_stage3": ("kcache.cli.inject", "evaluate_cmd"),
    "kcache.cli_finetune": ("kcache.cli.train", "finetune_cmd"),
    "kcache.cli_methods": ("kcache.cli.methods", "train_baseline_cmd"),
    "kcache.cli_baseline_eval": ("kcache.cli.methods", "evaluate_baselines_cmd"),
    "kcache.kg.cli": ("kcache.cli.kg", "link_cmd"),
    "kcache.data.cli": ("kcache.cli.data", "convert_cmd"),
    "kcache.bench_cache": ("kcache.bench.stages", "bench_fit"),
    "kcache.bench_store": ("kcache.bench.storage", "bench_store"),
    "kcache.baselines": ("kcache.methods.baselines", "train_baseline"),
    "kcache.knowla": ("kcache.methods.knowla", "train_knowla"),
    "kcache.evaluate_baselines": ("kcache.methods.scoring", "register_baseline_methods"),
}


@pytest.mark.parametrize("old", sorted(MOVED))
def test_old_module_paths_still_import_with_a_deprecation_warning(old, monkeypatch):
    new, name = MOVED[old]
    monkeypatch.delitem(sys.modules, old, raising=False)  # import it afresh; restored afterwards
    with pytest.warns(DeprecationWarning, match=re.escape(new)):
        mod = importlib.import_module(old)
    assert getattr(mod, name) is getattr(importlib.import_module(new), name)


def test_old_names_of_moved_things(monkeypatch):
    import typer

    import kcache.bench
    import kcache.cli

    for name in ("format_verdict", "bench_app"):  # kcache.bench keeps a name once looked up: look it up afresh
        monkeypatch.delitem(vars(kcache.bench), name, raising=False)
    for old in ("kcache.kg.cli", "kcache.cli_stage3"):
        monkeypatch.delitem(sys.modules, old, raising=False)
    with pytest.warns(DeprecationWarning, match="kcache.bench.inject"):
        from kcache.bench import format_verdict
    from kcache.bench.inject import format_verdict as new

    assert format_verdict is new
    with pytest.warns(DeprecationWarning):
        from kcache.bench import bench_app
    assert bench_app is kcache.cli.bench_app
    with pytest.warns(DeprecationWarning):
        from kcache.kg.cli import app as kg_app
    assert kg_app is kcache.cli.kg_app
    with pytest.warns(DeprecationWarning):
        from kcache.cli_stage3 import register  # the old way to add commands to another app
    app = typer.Typer()
    register(app)
    root = typer.main.get_command(app)
    assert list(root.commands) == ["generate", "evaluate", "bench"]
    assert list(root.commands["bench"].commands) == ["inject", "extract", "fit", "store"]


# Functions allowed over MAX_FUNCTION_LINES, as "path:name". kcache/store.py, storage.py, cache.py,
# location.py, integrity.py, merge.py and remote.py were left alone by the split (longest today:
# integrity.part_problems, 78 lines), so none is needed; an entry for one of them would read:
# moved to kcache/cache/ in a parallel branch; split there.
LONG_FUNCTIONS_ALLOWED: set[str] = set()
MAX_FUNCTION_LINES = 100


def _function_lengths():
    import ast

    for path in sorted((ROOT / "kcache").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        for node in ast.walk(ast.parse(path.read_text(), filename=rel)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):  # methods and nested functions included
                yield rel, node.lineno, node.name, node.end_lineno - node.lineno + 1


def test_no_function_is_longer_than_a_hundred_lines():
    """Issue 14: the stages read top to bottom, their checks, resume logic, loop body and report in
    named helpers; no function in kcache/ is over 100 lines."""
    long = [(rel, line, name, n) for rel, line, name, n in _function_lengths() if n > MAX_FUNCTION_LINES]
    offenders = [f"{rel}:{line}:{name}:{n}" for rel, line, name, n in long if f"{rel}:{name}" not in LONG_FUNCTIONS_ALLOWED]
    assert not offenders, f"functions over {MAX_FUNCTION_LINES} lines (file:line:name:length): " + ", ".join(offenders)
    stale = LONG_FUNCTIONS_ALLOWED - {f"{rel}:{name}" for rel, _, name, _ in long}
    assert not stale, f"allowed to be long but no longer are (or are gone): {sorted(stale)}; drop them from LONG_FUNCTIONS_ALLOWED"
