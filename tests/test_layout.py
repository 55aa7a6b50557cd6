"""The package layout (issue 14): the command line in kcache/cli/ (the only importer of typer, one
command table), benchmarks in kcache/bench/, methods beside DIEKÆ in kcache/methods/, the cache
format and its sharing in kcache/cache/, the old module paths still importable with a
DeprecationWarning, and no import cycle among kcache modules."""

from __future__ import annotations

import importlib
import os
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Modules outside kcache/cli/ that still import typer, each with the reason (none left).
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
    assert list(root.commands["bench"].commands) == ["inject", "extract", "fit", "finetune", "store"]


# ---------------------------------------------------------------------------------------------
# the cache package (kcache/cache/) and import cycles

CACHE_MOVED = {
    "kcache.storage": ("kcache.cache.lossy", "encode_block"),
    "kcache.location": ("kcache.cache.location", "Location"),
    "kcache.integrity": ("kcache.cache.integrity", "validate_cache"),
    "kcache.merge": ("kcache.cache.merge", "merge"),
    "kcache.remote": ("kcache.cache.remote", "pull"),
}


@pytest.mark.parametrize("old", sorted(CACHE_MOVED))
def test_old_cache_module_paths_are_the_new_modules(old, monkeypatch):
    new, name = CACHE_MOVED[old]
    monkeypatch.delitem(sys.modules, old, raising=False)
    with pytest.warns(DeprecationWarning, match=re.escape(new)):
        mod = importlib.import_module(old)
    assert mod is importlib.import_module(new)  # one module object: monkeypatching either path patches both
    assert getattr(mod, name) is getattr(importlib.import_module(new), name)


def test_old_store_module_forwards_to_writer_and_format(monkeypatch):
    from kcache.cache import format, writer

    monkeypatch.delitem(sys.modules, "kcache.store", raising=False)
    with pytest.warns(DeprecationWarning, match=r"kcache\.cache\.writer or kcache\.cache\.format"):
        import kcache.store as store
    for name in ("create_cache", "DeltaWriter", "RunningStats", "read_last_commit", "compressors_for_cache", "_array"):
        assert getattr(store, name) is getattr(writer, name)
    for name in ("CacheError", "encode_rows", "decode_rows", "DTYPES", "FORMAT", "SCHEMA_VERSION", "ATTRS_KEY",
                 "COMMIT_LOG"):
        assert getattr(store, name) is getattr(format, name)
    from kcache._io import now

    assert store.now is now


def test_cache_package_surface():
    import kcache.cache as kc
    from kcache.cache import format, integrity, lossy, reader, remote
    from kcache.cache.merge import merge
    from kcache.errors import KCacheError
    from kcache.lock import OutputLocked
    from kcache.paths import safe_relpath

    assert kc.Cache is reader.Cache and kc.open_cache is reader.open_cache
    assert kc.CacheError is format.CacheError and issubclass(kc.CacheError, (KCacheError, ValueError))
    assert issubclass(OutputLocked, kc.CacheError)
    with pytest.raises(kc.CacheError):
        safe_relpath("../x", "here")  # kcache.paths raises the same CacheError
    assert kc.merge is merge and callable(kc.merge)  # the function, not the submodule of that name
    assert kc.pull is remote.pull and kc.validate is kc.validate_cache is integrity.validate_cache
    assert kc.finalize is integrity.finalize and kc.parse_storage is lossy.parse_storage
    assert set(kc.__all__) <= set(vars(kc))


def test_old_names_of_the_cache_module(monkeypatch):
    import kcache.cache as kc
    from kcache.cache import format, reader

    for name in ("Part", "MANIFEST"):
        monkeypatch.delitem(vars(kc), name, raising=False)  # kcache.cache keeps a name once looked up
    with pytest.warns(DeprecationWarning, match=r"kcache\.cache\.reader"):
        from kcache.cache import Part
    assert Part is reader.Part
    with pytest.warns(DeprecationWarning, match=r"kcache\.cache\.format"):
        assert kc.MANIFEST == format.MANIFEST == "manifest.json"
    assert not hasattr(kc, "no_such_name")


def _kcache_modules() -> list[str]:
    out = []
    for path in sorted((ROOT / "kcache").rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        if parts[-1] != "__main__":
            out.append(".".join(parts))
    return out


def _is_module(name: str) -> bool:
    base = ROOT.joinpath(*name.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def _module_level_imports(name: str) -> set[str]:
    """kcache modules that importing ``name`` imports at once: its module-level ``import kcache…`` and
    ``from kcache… import`` statements (in ``if``/``try`` blocks too, never in a function or class),
    the ``kcache._moved`` calls of the old-path modules, and the packages above each imported module."""
    import ast

    base = ROOT.joinpath(*name.split("."))
    path = base / "__init__.py" if base.is_dir() else base.with_suffix(".py")
    package = name if base.is_dir() else name.rpartition(".")[0]
    direct: set[str] = set()

    def visit(body):
        for node in body:
            if isinstance(node, ast.Import):
                direct.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                mod = node.module or ""
                if node.level:  # relative: from . import x, from .a import y
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    mod = ".".join(anchor + ([mod] if mod else []))
                direct.add(mod)
                direct.update(f"{mod}.{a.name}" for a in node.names if _is_module(f"{mod}.{a.name}"))
            elif isinstance(node, (ast.If, ast.Try)):
                for block in ("body", "orelse", "finalbody"):
                    visit(getattr(node, block, []))
                for handler in getattr(node, "handlers", []):
                    visit(handler.body)
            elif isinstance(node, (ast.Expr, ast.Assign)) and isinstance(node.value, ast.Call):
                call = node.value
                if getattr(call.func, "id", None) in ("alias", "forward"):  # kcache._moved
                    direct.update(a.value for a in call.args if isinstance(a, ast.Constant)
                                  and str(a.value).startswith("kcache."))

    visit(ast.parse(path.read_text(), str(path)).body)
    out = set()
    for mod in direct:
        if mod.split(".")[0] != "kcache":
            continue
        parts = mod.split(".")
        for i in range(1, len(parts) + 1):
            above = ".".join(parts[:i])
            # Importing a.b.c runs the packages a and a.b first, except those this module is inside
            # (they are being imported already: a package importing its own modules is no cycle).
            if above != name and not (name + ".").startswith(above + ".") and _is_module(above):
                out.add(above)
    return out


def test_no_import_cycles_among_kcache_modules():
    graph = {m: _module_level_imports(m) for m in _kcache_modules()}
    # Tarjan's strongly connected components: a component of more than one module is a cycle.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in graph.get(v, ()):
                cycles.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    assert not cycles, ("import cycles among kcache modules (module-level imports): "
                        + "; ".join(" <-> ".join(c) for c in cycles))
    assert graph["kcache.cache.format"] <= {"kcache", "kcache.errors"}
    assert "kcache.cache" not in graph["kcache.paths"] | graph["kcache.lock"]  # below the package


IMPORT_ALONE = r"""
import importlib, os, sys, traceback, warnings
modules, preload = sys.argv[1].split(","), sys.argv[2].split(",")
for name in preload:  # third-party modules only: each child below still imports kcache from nothing
    try:
        importlib.import_module(name)
    except Exception:
        pass
assert not any(m == "kcache" or m.startswith("kcache.") for m in sys.modules), "kcache imported by the preload"
failed = []
for name in modules:
    pid = os.fork()
    if pid == 0:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # the old paths warn, by design
                importlib.import_module(name)
        except BaseException:
            traceback.print_exc()
            sys.stderr.flush()
            os._exit(1)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    if status:
        failed.append(name)
print("FAILED " + ",".join(failed) if failed else "OK %d" % len(modules))
"""


@pytest.mark.integration
def test_every_kcache_module_imports_on_its_own():
    """Each module imported first, in a process where no kcache module was imported yet (a fork of
    one that only preloaded the third-party libraries kcache imports, so the heavy ones load once):
    an import cycle shows up as an ImportError of a partially initialized module."""
    import ast
    import subprocess

    modules = _kcache_modules()
    preload = set()
    for m in modules:
        base = ROOT.joinpath(*m.split("."))
        path = base / "__init__.py" if base.is_dir() else base.with_suffix(".py")
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Import):
                preload.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                preload.add(node.module)
    preload = sorted(p for p in preload if p.split(".")[0] not in ("kcache", "__future__"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-c", IMPORT_ALONE, ",".join(modules), ",".join(preload)],
                       capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert r.returncode == 0 and r.stdout.strip() == f"OK {len(modules)}", r.stdout + r.stderr[-5000:]


@pytest.mark.integration
def test_public_api_is_lazy_and_complete():
    import subprocess
    import sys

    code = ("import sys, kcache; assert 'torch' not in sys.modules, 'import kcache pulled in torch'; "
            "[getattr(kcache, n) for n in kcache.__all__]; print(len(kcache.__all__))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.strip()) >= 10


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
    offenders = [f"{rel}:{line}:{name}:{n}" for rel, line, name, n in long
                 if f"{rel}:{name}" not in LONG_FUNCTIONS_ALLOWED]
    assert not offenders, f"functions over {MAX_FUNCTION_LINES} lines (file:line:name:length): " + ", ".join(offenders)
    stale = LONG_FUNCTIONS_ALLOWED - {f"{rel}:{name}" for rel, _, name, _ in long}
    assert not stale, (f"allowed to be long but no longer are (or are gone): {sorted(stale)}; "
                       "drop them from LONG_FUNCTIONS_ALLOWED")


# A test that starts a process (the CLI, torchrun ranks, a writer killed with -9), directly or through
# a helper or fixture of its own file, is an integration test: `pytest -m "not integration"` is the
# quick in-process suite.
_SPAWNS = re.compile(r"subprocess\.|Popen|torch\.distributed\.run|os\.kill|signal\.SIGKILL")


def _unmarked_process_tests(path: Path) -> list[str]:
    import ast

    src = path.read_text()
    tree = ast.parse(src)
    funcs = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    spawners = {name for name, n in funcs.items()
                if not name.startswith("test_") and _SPAWNS.search(ast.get_source_segment(src, n))}
    module_marked = any(isinstance(n, ast.Assign) and any(getattr(t, "id", "") == "pytestmark" for t in n.targets)
                        and "integration" in ast.get_source_segment(src, n) for n in tree.body)
    out = []
    for name, n in funcs.items():
        if not name.startswith("test_") or module_marked:
            continue
        body = ast.get_source_segment(src, n)
        spawns = (_SPAWNS.search(body) or any(re.search(rf"\b{s}\(", body) for s in spawners)
                  or {a.arg for a in n.args.args} & spawners)
        marked = any("integration" in ast.get_source_segment(src, d) for d in n.decorator_list)
        if spawns and not marked:
            out.append(f"{path.name}::{name}")
    return out


def test_tests_that_start_processes_are_marked_integration():
    unmarked = [t for p in sorted((ROOT / "tests").glob("test_*.py")) for t in _unmarked_process_tests(p)]
    assert unmarked == [], f"start processes but lack @pytest.mark.integration: {unmarked}"


def test_the_process_check_sees_a_spawning_helper(tmp_path):
    f = tmp_path / "test_x.py"
    f.write_text("import subprocess\n\ndef run_it():\n    subprocess" ".run(['true'])\n\n"  # split: not a match here
                 "def test_a():\n    run_it()\n\ndef test_b():\n    assert 1\n")
    assert _unmarked_process_tests(f) == ["test_x.py::test_a"]


@pytest.mark.integration
def test_evaluation_methods_do_not_depend_on_what_else_was_imported():
    # `kcache evaluate --methods ekx_fit` used to work only once kcache.stages had been imported.
    import subprocess

    code = ("import sys, kcache.evaluate as e; assert 'kcache.stages' not in sys.modules; "
            "print(sorted(m for m in e.METHODS if m.startswith('ekx')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["['ekx',", "'ekx_fit',", "'ekx_ft']"]
