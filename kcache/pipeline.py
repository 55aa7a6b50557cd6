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
from pathlib import Path

from kcache.config import ConfigError, config_from

STAGES = ("data", "extract", "fit", "finetune", "evaluate", "edit")


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


def load_pipeline(path: str | Path) -> dict:
    """Read and check a whole pipeline config without running anything: every section built into
    its settings, every error a ``ConfigError`` naming the file, the section and the key.

    Returns ``{"path", "raw"`` (the TOML as read), ``"run"`` (``RunOptions``), ``"data"``
    (``data_options``) and, for each stage section present, ``"extract"`` (``ExtractConfig``),
    ``"fit"`` (``FitConfig``), ``"finetune"`` (``(FinetuneConfig, StageIO)``), ``"evaluate"``
    (``(EvaluateOptions, (EditConfig, StageIO) or None)``), ``"edit"`` (``(EditConfig, StageIO)``)``}``."""
    from kcache import stages
    from kcache.extract import ExtractConfig
    from kcache.fit import FitConfig

    path = Path(path)
    cfg = load_config(path)
    out: dict = {"path": path, "raw": cfg, "run": config_from(RunOptions, cfg["run"], "run", path),
                 "data": data_options(cfg, path)}
    if "extract" in cfg:
        out["extract"] = config_from(ExtractConfig, cfg["extract"], "extract", path)
    if "fit" in cfg:
        out["fit"] = config_from(FitConfig, cfg["fit"], "fit", path)
    if "finetune" in cfg:
        out["finetune"] = stages.finetune_options(cfg, path)
    if "evaluate" in cfg:
        out["evaluate"] = stages.evaluate_options(cfg, path)
    if "edit" in cfg:
        out["edit"] = stages.edit_options(cfg["edit"], "edit", path)
    return out


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


def _extract_key(model: str, ecfg, samples: Path) -> dict:
    """What makes a finished extraction reusable without loading the decoder: the model as named in
    the config (a local path: also its size and mtime), the extract settings and the sample set."""
    import dataclasses

    from kcache.data.samples import read_samples, sample_set_fingerprint

    mp = Path(model)
    ident = {"model": model, **({"model_stat": [mp.stat().st_size, mp.stat().st_mtime_ns]} if mp.exists() else {})}
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


def run_pipeline(config: str | Path, log=print) -> dict:
    """Run (or resume) every stage of a pipeline config; returns the report (also written to
    ``[run].dir/report.json``)."""
    built = load_pipeline(config)  # every section checked before any work
    cfg, run = built["raw"], built["run"]
    run_dir = Path(run.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    report: dict = {"config": str(config), "stages": {}}
    timings = {}
    skipped: list[str] = []
    previous = _previous_seconds(run_dir / "report.json")

    def timed(stage: str, t0: float, was_skipped: bool) -> None:
        # A skipped stage keeps the time of the run that did its work, so report.json says what it costs.
        timings[stage] = previous.get(stage, time.perf_counter() - t0) if was_skipped else time.perf_counter() - t0
        if was_skipped:
            skipped.append(stage)

    t0 = time.perf_counter()
    samples = _data(built["data"], run_dir, log)
    timings["data"] = time.perf_counter() - t0

    decoder = None

    def get_decoder():
        nonlocal decoder
        if decoder is None:
            from kcache.models import load_decoder

            decoder = load_decoder(run.model, device=run.device, dtype=run.model_dtype)
        return decoder

    cache = run_dir / "cache.zarr"
    if "extract" in cfg:
        from kcache.extract import extract

        t0 = time.perf_counter()
        ecfg = built["extract"]
        key = _extract_key(run.model, ecfg, samples)
        old = _previous_stage(run_dir / "report.json", "extract")
        if old.get("key") == key and (cache / "manifest.json").exists():
            # Same model, settings and samples as the run that finalized the cache: no decoder needed.
            log(f"extract: {cache} complete for these settings (skipped)")
            report["stages"]["extract"] = {**old, "status": "already complete"}
        else:
            rep = extract(get_decoder(), samples, cache, ecfg)
            for line in rep.lines():
                log(f"extract: {line}")
            report["stages"]["extract"] = {"samples": rep.samples, "skipped": rep.skipped, "status": rep.status,
                                           "input_tokens": rep.input_tokens, "key": key}
        timed("extract", t0, report["stages"]["extract"]["status"] == "already complete")

    encoders = run_dir / "encoders"
    if "fit" in cfg:
        from kcache.fit import fit_encoders, summary_table

        t0 = time.perf_counter()
        summary = fit_encoders(cache, encoders, built["fit"])
        log("fit:\n" + summary_table(summary))
        timed("fit", t0, bool(summary.get("skipped")))
        report["stages"]["fit"] = summary

    for stage in ("finetune", "evaluate", "edit"):
        if stage in cfg:
            from kcache import stages

            t0 = time.perf_counter()
            report["stages"][stage] = stages.run_stage(stage, cfg, run_dir, get_decoder, samples, cache, log)
            timed(stage, t0, bool(report["stages"][stage].get("skipped")))

    report["seconds"] = timings
    report["skipped"] = skipped
    (run_dir / "report.json").write_text(json.dumps(report, indent=2, default=str))
    log(f"pipeline done in {sum(timings.values()):.0f} s: "
        + ", ".join(f"{k} {v:.0f} s" + (" (earlier run)" if k in skipped else "") for k, v in timings.items()))
    log(f"report: {run_dir / 'report.json'}")
    return report
