"""``kcache run CONFIG.toml``: the whole pipeline as one recipe.

Stages run in order (data -> extract -> fit -> finetune -> evaluate -> edit) under ``[run].dir``; a
stage whose output is already complete for the same settings is skipped (extraction and
training also resume after an interruption). Each stage is the same Python function its CLI
command calls.
"""

from __future__ import annotations

import json
import time
import tomllib
from pathlib import Path

STAGES = ("data", "extract", "fit", "finetune", "evaluate", "edit")


def load_config(path: str | Path) -> dict:
    path = Path(path)
    try:
        cfg = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ValueError(f"{path}: cannot read pipeline config: {e}") from None
    unknown = set(cfg) - {"run", *STAGES}
    if unknown:
        raise ValueError(f"{path}: unknown section(s) {sorted(unknown)}; expected run, {', '.join(STAGES)}")
    if "run" not in cfg or "dir" not in cfg["run"]:
        raise ValueError(f"{path}: [run] dir = \"...\" is required")
    return cfg


def _data(cfg: dict, run_dir: Path, log) -> Path:
    from kcache.data.samples import read_samples, sample_set_fingerprint, write_samples
    from kcache.data.synth import synth_samples

    d = cfg.get("data", {})
    if "samples" in d:
        path = Path(d["samples"])
        read_samples(path)  # validate up front
        log(f"data: using {path}")
        return path
    if "convert" in d:
        table = _converted(d["convert"], run_dir)
    else:
        s = d.get("synth", {})
        table = synth_samples(s.get("n", 1200), s.get("seed", 0), s.get("distractors", 3))
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
    return {**ident, "extract": json.loads(json.dumps(dataclasses.asdict(ecfg))), "samples": sample_set_fingerprint(read_samples(samples))}


def _converted(c: dict, run_dir: Path):
    """``[data] convert = {name, input, split?, reference?, split_sizes?, by?, seed?}``: a public
    dataset converted (``kcache data convert``), then optionally re-split by whole groups
    (``kcache data split``: ``split_sizes = [train, validation, test]`` grouped by meta ``by``)."""
    from kcache.data.convert import convert
    from kcache.data.samples import read_samples
    from kcache.data.split import SPLITS, split_by_group

    known = {"name", "input", "split", "reference", "split_sizes", "by", "seed"}
    unknown = sorted(set(c) - known)
    if unknown or "name" not in c or "input" not in c:
        raise ValueError(f"[data] convert: needs name and input; unknown key(s) {unknown}; known: {', '.join(sorted(known))}")
    raw = run_dir / "converted.parquet"
    convert(c["name"], c["input"], raw, c.get("split"), reference=bool(c.get("reference", False)))
    table = read_samples(raw)
    if "split_sizes" in c:
        table = split_by_group(table, dict(zip(SPLITS, c["split_sizes"])), c.get("by", "dialogue_id"), int(c.get("seed", 0)))
    return table


def run_pipeline(config: str | Path, log=print) -> dict:
    """Run (or resume) every stage of a pipeline config; returns the report (also written to
    ``[run].dir/report.json``)."""
    cfg = load_config(config)
    run = cfg["run"]
    run_dir = Path(run["dir"])
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
    samples = _data(cfg, run_dir, log)
    timings["data"] = time.perf_counter() - t0

    decoder = None

    def get_decoder():
        nonlocal decoder
        if decoder is None:
            from kcache.models import load_decoder

            decoder = load_decoder(run.get("model", "smollm2-135m"), device=run.get("device"), dtype=run.get("model_dtype"))
        return decoder

    cache = run_dir / "cache.zarr"
    if "extract" in cfg:
        from kcache.extract import ExtractConfig, extract

        t0 = time.perf_counter()
        from kcache.stages import _config_from

        ecfg = _config_from(ExtractConfig, cfg["extract"], "extract")
        key = _extract_key(run.get("model", "smollm2-135m"), ecfg, samples)
        old = _previous_stage(run_dir / "report.json", "extract")
        if old.get("key") == key and (cache / "manifest.json").exists():
            # Same model, settings and samples as the run that finalized the cache: no decoder needed.
            log(f"extract: {cache} complete for these settings (skipped)")
            report["stages"]["extract"] = {**old, "status": "already complete"}
        else:
            rep = extract(get_decoder(), samples, cache, ecfg)
            for line in rep.lines():
                log(f"extract: {line}")
            report["stages"]["extract"] = {"samples": rep.samples, "skipped": rep.skipped, "status": rep.status, "input_tokens": rep.input_tokens,
                                           "key": key}
        timed("extract", t0, report["stages"]["extract"]["status"] == "already complete")

    encoders = run_dir / "encoders"
    if "fit" in cfg:
        from kcache.fit import FitConfig, fit_encoders, summary_table

        t0 = time.perf_counter()
        from kcache.stages import _config_from

        summary = fit_encoders(cache, encoders, _config_from(FitConfig, cfg["fit"], "fit"))
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
    log(f"pipeline done in {sum(timings.values()):.0f} s: " + ", ".join(f"{k} {v:.0f} s" + (" (earlier run)" if k in skipped else "") for k, v in timings.items()))
    log(f"report: {run_dir / 'report.json'}")
    return report
