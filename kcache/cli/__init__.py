"""The ``kcache`` command line: one typer app, one command table.

Every command is a thin layer over a library function (docs/architecture.md); the command
functions live in one module per group of commands:

============  =====================================================================
module        commands
============  =====================================================================
``cache``     ``extract``, ``inspect``, ``validate``, ``merge``, ``finalize``, ``pull``, ``push``
``train``     ``fit-encoders``, ``finetune``, ``edit``
``pipeline``  ``run``
``inject``    ``generate``, ``evaluate``
``methods``   ``train-baseline``, ``eval-choice``, ``evaluate-baselines``, ``knowla …``
``data``      ``data …``
``kg``        ``kg …``
``bench``     ``bench …``
``errors``    the one error handler: exceptions -> ``error: …`` and an exit code
============  =====================================================================

:data:`COMMANDS` maps each command name to its function, or a group name to a :class:`Group` of
them; it is the only place commands are registered, in ``kcache --help`` order. This package is
the only one in kcache that imports typer. Entry points: ``kcache`` (``[project.scripts]``,
``kcache.cli:app``) and ``python -m kcache``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import typer

from kcache import __version__
from kcache.cli import bench, cache, data, inject, kg, methods, pipeline, train
from kcache.cli.errors import KCacheGroup


@dataclasses.dataclass(frozen=True)
class Group:
    """A command group (``kcache data …``): its help line and its commands."""

    help: str
    commands: dict[str, Callable]


COMMANDS: dict[str, Callable | Group] = {
    "extract": cache.extract_cmd,
    "inspect": cache.inspect_cmd,
    "validate": cache.validate_cmd,
    "fit-encoders": train.fit_cmd,
    "merge": cache.merge_cmd,
    "finalize": cache.finalize_cmd,
    "run": pipeline.run_cmd,
    "generate": inject.generate_cmd,
    "evaluate": inject.evaluate_cmd,
    "finetune": train.finetune_cmd,
    "edit": train.edit_cmd,
    "pull": cache.pull_cmd,
    "push": cache.push_cmd,
    "train-baseline": methods.train_baseline_cmd,
    "eval-choice": methods.eval_choice_cmd,
    "evaluate-baselines": methods.evaluate_baselines_cmd,
    "data": Group(data.HELP, {
        "synth": data.synth_cmd,
        "convert": data.convert_cmd,
        "split": data.split_cmd,
        "stats": data.stats_cmd,
    }),
    "kg": Group(kg.HELP, {
        "import-openke": kg.import_openke_cmd,
        "import-word2vec": kg.import_word2vec_cmd,
        "import-numpy": kg.import_numpy_cmd,
        "embed": kg.embed_cmd,
        "link": kg.link_cmd,
        "stats": kg.stats_cmd,
    }),
    "bench": Group(bench.HELP, {
        "inject": bench.inject_cmd,
        "extract": bench.extract_cmd,
        "fit": bench.fit_cmd,
        "finetune": bench.finetune_cmd,
        "store": bench.store_cmd,
    }),
    "knowla": Group(methods.KNOWLA_HELP, {
        "train": methods.knowla_train_cmd,
        "eval": methods.knowla_eval_cmd,
    }),
}


def mount(target: typer.Typer, table: dict[str, Callable | Group] = COMMANDS, names=None) -> dict[str, typer.Typer]:
    """Add the commands and groups of ``table`` (only ``names``, when given) to ``target`` -> the
    group apps made, by name. Every command of a group also runs inside the error handler on its
    own (its function enters :func:`kcache.cli.errors.errors`), for a group app invoked alone."""
    groups = {}
    for name, entry in table.items():
        if names is not None and name not in names:
            continue
        if isinstance(entry, Group):
            sub = typer.Typer(help=entry.help, no_args_is_help=True)
            mount(sub, entry.commands)
            target.add_typer(sub, name=name)
            groups[name] = sub
        else:
            target.command(name)(entry)
    return groups


app = typer.Typer(
    help="kcache: inject external knowledge into a frozen decoder (DIEKÆ), cache-first.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    cls=KCacheGroup,  # every command runs inside kcache.cli.errors.errors(): one error line and exit code per kind
)


def _version(value: bool):
    if value:
        typer.echo(f"kcache {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="print the version and exit"),
    threads: int = typer.Option(None, "--threads", envvar="KCACHE_THREADS",
                                help="torch CPU threads for any command (default: the cores free when it starts, at "
                                     "most torch's default; OMP_NUM_THREADS set: torch's choice)"),
):
    """kcache command line."""
    from kcache.runtime import keep_freed_memory, set_threads

    set_threads(threads, warn=lambda m: typer.echo(f"warning: {m}", err=True))
    keep_freed_memory()


_groups = mount(app)
data_app, kg_app, bench_app, knowla_app = (_groups[n] for n in ("data", "kg", "bench", "knowla"))
