"""``kcache run CONFIG.toml``: the whole pipeline as one recipe.

Stages run in order (data -> extract -> fit -> finetune -> evaluate -> edit) under ``[run].dir``; a
stage whose output is already complete for the same settings is skipped (extraction and
training also resume after an interruption). Each stage is the same Python function its CLI
command calls.

``load_pipeline(path)`` reads the TOML and builds every section into its settings (through
``kcache.config.config_from``: ``lr`` for ``lr_max``, unknown keys and wrong types refused with
the file, section and key named) before anything runs; ``run_pipeline`` starts with it.
"""

from __future__ import annotations

import dataclasses
import json
import time
import tomllib
from collections.abc import Callable
from pathlib import Path

from kcache import stages
from kcache.config import ConfigError, config_from


@dataclasses.dataclass
class RunOptions:
    """``[run]``."""

    dir: str
    model: str = "smollm2-135m"
    device: str | None = None  # default: cuda when available
    model_dtype: str | None = None


@dataclasses.dataclass
class DataOptions:
    """``[data]``: one of ``samples`` (a samples file), ``convert`` (``ConvertOptions``) or
    ``synth`` (``SynthOptions``; the default)."""

    samples: str | None = None
    convert: dict | None = None
    synth: dict | None = None


@dataclasses.dataclass
class SynthOptions:
    """``[data] synth = {n, seed, distractors}``: ``kcache data synth``."""

    n: int = 1200
    seed: int = 0
    distractors: int = 3


@dataclasses.dataclass
class ConvertOptions:
    """``[data] convert = {name, input, split?, reference?, split_sizes?, by?, seed?}``: a public
    dataset converted (``kcache data convert``), then optionally re-split by whole groups
    (``kcache data split``: ``split_sizes = [train, validation, test]`` grouped by meta ``by``)."""

    name: str
    input: str
    split: str | None = None
    reference: bool = False
    split_sizes: tuple[int, int, int] | None = None
    by: str = "dialogue_id"
    seed: int = 0


def load_config(path: str | Path) -> dict:
    """The TOML of a pipeline config, its sections checked (not their keys: ``load_pipeline``)."""
    path = Path(path)
    try:
        cfg = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"{path}: cannot read pipeline config: {e}") from None
    unknown = set(cfg) - {"run", *STAGES}
    if unknown:
        raise ConfigError(f"{path}: unknown section(s) {sorted(unknown)}; expected run, {', '.join(STAGES)}")
    for name, table in cfg.items():
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: {name} must be a section ([{name}]), got {table!r}")
    if "run" not in cfg or "dir" not in cfg["run"]:
        raise ConfigError(f"{path}: [run] dir = \"...\" is required")
    return cfg


def data_options(cfg: dict, file=None) -> Path | ConvertOptions | SynthOptions:
    """Where ``[data]`` of ``cfg`` takes the samples from: a samples file, a conversion or the
    synthetic set (the default)."""
    d = config_from(DataOptions, cfg.get("data") or {}, "data", file)
    given = [k for k in ("samples", "convert", "synth") if getattr(d, k) is not None]
    if len(given) > 1:
        raise ConfigError(f"{f'{file}: ' if file is not None else ''}[data] give one of samples, convert, synth, "
                          f"not {' and '.join(given)}")
    if d.samples is not None:
        return Path(d.samples)
    if d.convert is not None:
        return config_from(ConvertOptions, d.convert, "data.convert", file)
    return config_from(SynthOptions, d.synth or {}, "data.synth", file)


def _extract_options(cfg: dict, file=None):
    from kcache.extract import ExtractConfig

    return config_from(ExtractConfig, cfg["extract"], "extract", file)


def _fit_options(cfg: dict, file=None):
    from kcache.fit import FitConfig

    return config_from(FitConfig, cfg["fit"], "fit", file)


@dataclasses.dataclass
class Context:
    """What every stage of one run shares: the settings, the run folder, the samples (set by the
    data stage), the cache path, the decoder (loaded on first use) and the log."""

    raw: dict
    run: RunOptions
    run_dir: Path
    get_decoder: Callable
    log: Callable = print
    samples: Path | None = None
    cache: Path | None = None
    report: Path | None = None  # the previous report.json (stages reuse what it recorded)


@dataclasses.dataclass(frozen=True)
class Stage:
    """One pipeline stage: ``options(cfg, file)`` builds its settings from the whole TOML (a
    ``ConfigError`` names file, section and key); ``run(ctx, settings)`` does the work (or skips it
    when its output is complete for the same settings) and returns a JSON-ready summary whose
    ``skipped`` says which."""

    options: Callable
    run: Callable


def load_pipeline(path: str | Path) -> dict:
    """Read and check a whole pipeline config without running anything: every section built into
    its settings, every error a ``ConfigError`` naming the file, the section and the key.

    Returns ``{"path", "raw"`` (the TOML as read), ``"run"`` (``RunOptions``), ``"data"``
    (``data_options``) and, for each stage section present, ``"extract"`` (``ExtractConfig``),
    ``"fit"`` (``FitConfig``), ``"finetune"`` (``(FinetuneConfig, StageIO)``), ``"evaluate"``
    (``(EvaluateOptions, (EditConfig, StageIO) or None)``), ``"edit"`` (``(EditConfig, StageIO)``)``}``."""
    path = Path(path)
    cfg = load_config(path)
    out: dict = {"path": path, "raw": cfg, "run": config_from(RunOptions, cfg["run"], "run", path)}
    for name, stage in STAGES.items():
        if name == "data" or name in cfg:  # data has a default (the synthetic set)
            out[name] = stage.options(cfg, path)
    return out


def _run_data(ctx: Context, source) -> dict:
    ctx.samples = _data(source, ctx.run_dir, ctx.log)
    return {"samples": str(ctx.samples), "skipped": False}


def _data(source, run_dir: Path, log) -> Path:
    from kcache.data.samples import read_samples, sample_set_fingerprint, write_samples
    from kcache.data.synth import synth_samples

    if isinstance(source, Path):
        read_samples(source)  # validate up front
        log(f"data: using {source}")
        return source
    if isinstance(source, ConvertOptions):
        table = _converted(source, run_dir)
    else:
        table = synth_samples(source.n, source.seed, source.distractors)
    path = run_dir / "samples.parquet"
    if path.exists() and sample_set_fingerprint(read_samples(path)) == sample_set_fingerprint(table):
        log(f"data: {path} up to date (skipped)")
        return path
    write_samples(table, path)
    log(f"data: wrote {table.num_rows} synthetic samples to {path}")
    return path


def _previous_report(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _previous_seconds(path: Path) -> dict:
    return dict(_previous_report(path).get("seconds") or {})


def _previous_stage(path: Path, stage: str) -> dict:
    return dict((_previous_report(path).get("stages") or {}).get(stage) or {})


def _extract_key(run: RunOptions, ecfg, samples: Path) -> dict:
    """What makes a finished extraction reusable without loading the decoder: the model as named in
    the config (a local path: also its size and mtime) and the dtype it loads in, the extract
    settings and the sample set."""
    from kcache.data.samples import read_samples, sample_set_fingerprint
    from kcache.models import resolve_device, resolve_dtype

    model = run.model
    mp = Path(model)
    ident = {"model": model, **({"model_stat": [mp.stat().st_size, mp.stat().st_mtime_ns]} if mp.exists() else {}),
             # the dtype "auto" resolves to here: a cache of another decoder dtype is not reused
             # silently (the extract stage then refuses it, naming both dtypes)
             "model_dtype": str(resolve_dtype(run.model_dtype, resolve_device(run.device))).removeprefix("torch.")}
    return {**ident, "extract": json.loads(json.dumps(dataclasses.asdict(ecfg))),
            "samples": sample_set_fingerprint(read_samples(samples))}


def _converted(c: ConvertOptions, run_dir: Path):
    from kcache.data.convert import convert
    from kcache.data.samples import read_samples
    from kcache.data.split import SPLITS, split_by_group

    raw = run_dir / "converted.parquet"
    convert(c.name, c.input, raw, c.split, reference=c.reference)
    table = read_samples(raw)
    if c.split_sizes is not None:
        table = split_by_group(table, dict(zip(SPLITS, c.split_sizes)), c.by, c.seed)
    return table


def _run_extract(ctx: Context, ecfg) -> dict:
    from kcache.extract import extract

    key = _extract_key(ctx.run, ecfg, ctx.samples)
    old = _previous_stage(ctx.report, "extract") if ctx.report is not None else {}
    if old.get("key") == key and (ctx.cache / "manifest.json").exists():
        # Same model, settings and samples as the run that finalized the cache: no decoder needed.
        ctx.log(f"extract: {ctx.cache} complete for these settings (skipped)")
        return {**old, "status": "already complete"}
    rep = extract(ctx.get_decoder(), ctx.samples, ctx.cache, ecfg)
    for line in rep.lines():
        ctx.log(f"extract: {line}")
    return {"samples": rep.samples, "skipped": rep.skipped, "status": rep.status,
            "input_tokens": rep.input_tokens, "key": key}


def _run_fit(ctx: Context, fcfg) -> dict:
    from kcache.fit import fit_encoders, summary_table

    summary = fit_encoders(ctx.cache, ctx.run_dir / "encoders", fcfg)
    ctx.log("fit:\n" + summary_table(summary))
    return {**summary, "skipped": bool(summary.get("skipped"))}


def _was_skipped(summary: dict) -> bool:
    """Whether a stage found its output complete: extract says so in ``status`` (its ``skipped`` is
    the number of samples it skipped, as report.json has always had it), the others in ``skipped``."""
    if "status" in summary:
        return summary["status"] == "already complete"
    return bool(summary.get("skipped"))


def run_pipeline(config: str | Path, log=print) -> dict:
    """Run (or resume) every stage of a pipeline config in ``STAGES`` order; returns the report
    (also written to ``[run].dir/report.json``)."""
    built = load_pipeline(config)  # every section checked before any work
    run = built["run"]
    run_dir = Path(run.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    decoder = None

    def get_decoder():
        nonlocal decoder
        if decoder is None:
            from kcache.models import load_decoder

            decoder = load_decoder(run.model, device=run.device, dtype=run.model_dtype)
        return decoder

    ctx = Context(raw=built["raw"], run=run, run_dir=run_dir, get_decoder=get_decoder, log=log,
                  cache=run_dir / "cache.zarr", report=run_dir / "report.json")
    previous = _previous_seconds(ctx.report)
    report: dict = {"config": str(config), "stages": {}}
    timings: dict = {}
    skipped: list[str] = []
    for name, stage in STAGES.items():
        if name not in built:
            continue
        t0 = time.perf_counter()
        summary = stage.run(ctx, built[name])
        # A skipped stage keeps the time of the run that did its work, so report.json says what it costs.
        was_skipped = _was_skipped(summary)
        timings[name] = previous.get(name, time.perf_counter() - t0) if was_skipped else time.perf_counter() - t0
        if was_skipped:
            skipped.append(name)
        if name != "data":
            report["stages"][name] = summary

    report["seconds"] = timings
    report["skipped"] = skipped
    (run_dir / "report.json").write_text(json.dumps(report, indent=2, default=str))
    log(f"pipeline done in {sum(timings.values()):.0f} s: "
        + ", ".join(f"{k} {v:.0f} s" + (" (earlier run)" if k in skipped else "") for k, v in timings.items()))
    log(f"report: {run_dir / 'report.json'}")
    return report


# The pipeline, in order: each stage's settings builder and runner (see ``Stage``). ``load_pipeline``
# builds every section present, ``run_pipeline`` runs them, ``stages.run_stage`` runs one.
STAGES: dict[str, Stage] = {
    "data": Stage(data_options, _run_data),
    "extract": Stage(_extract_options, _run_extract),
    "fit": Stage(_fit_options, _run_fit),
    "finetune": Stage(stages.finetune_options, stages.run_finetune),
    "evaluate": Stage(stages.evaluate_options, stages.run_evaluate),
    "edit": Stage(stages.top_edit_options, stages.run_edit),
}
