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
    s = d.get("synth", {})
    table = synth_samples(s.get("n", 1200), s.get("seed", 0), s.get("distractors", 3))
    path = run_dir / "samples.parquet"
    if path.exists() and sample_set_fingerprint(read_samples(path)) == sample_set_fingerprint(table):
        log(f"data: {path} up to date (skipped)")
        return path
    write_samples(table, path)
    log(f"data: wrote {table.num_rows} synthetic samples to {path}")
    return path


def run_pipeline(config: str | Path, log=print) -> dict:
    """Run (or resume) every stage of a pipeline config; returns the report (also written to
    ``[run].dir/report.json``)."""
    cfg = load_config(config)
    run = cfg["run"]
    run_dir = Path(run["dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    report: dict = {"config": str(config), "stages": {}}
    timings = {}

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
        ecfg = ExtractConfig(**cfg["extract"])
        rep = extract(get_decoder(), samples, cache, ecfg)
        for line in rep.lines():
            log(f"extract: {line}")
        timings["extract"] = time.perf_counter() - t0
        report["stages"]["extract"] = {"samples": rep.samples, "skipped": rep.skipped, "status": rep.status, "input_tokens": rep.input_tokens}

    encoders = run_dir / "encoders"
    if "fit" in cfg:
        from kcache.fit import FitConfig, fit_encoders, summary_table

        t0 = time.perf_counter()
        fcfg = dict(cfg["fit"])
        if "lr" in fcfg:
            fcfg["lr_max"] = fcfg.pop("lr")
        summary = fit_encoders(cache, encoders, FitConfig(**fcfg))
        log("fit:\n" + summary_table(summary))
        timings["fit"] = time.perf_counter() - t0
        report["stages"]["fit"] = summary

    for stage in ("finetune", "evaluate", "edit"):
        if stage in cfg:
            from kcache import stages

            t0 = time.perf_counter()
            report["stages"][stage] = stages.run_stage(stage, cfg, run_dir, get_decoder, samples, cache, log)
            timings[stage] = time.perf_counter() - t0

    report["seconds"] = timings
    (run_dir / "report.json").write_text(json.dumps(report, indent=2, default=str))
    log(f"pipeline done in {sum(timings.values()):.0f} s: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()))
    log(f"report: {run_dir / 'report.json'}")
    return report
