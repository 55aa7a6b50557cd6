"""``kcache bench store --downstream``: each storage option judged by what it does downstream.

For every option (kcache/cache/lossy.py) this adds to ``bench store``'s bytes, MB/s and raw error:

* ``val_fvu``: validation FVU (mean over layers) of encoders fitted for a short fixed run on the
  cache as that option stores it, measured against the *lossless* validation deltas, i.e. how good
  the encoders are; ``val_fvu_stored`` is the figure the fit itself reports, against the stored
  (lossy) targets, i.e. what a user of such a cache sees in ``summary.json``;
* ``ppl["ekx"]``: perplexity of D(E(K,x)+x) with those encoders injected, on a fixed set of held-out
  samples (the first ``test_samples`` samples of the cache's ``test`` split, in samples-file order,
  target tokens only);
* ``ppl["oracle"]``: perplexity with the stored deltas themselves injected (no fit): the storage
  error alone, on the upper bound the encoders are trained towards.

Every option is fitted with the same seed, steps, batch size, batches and initial weights, so the
lossless option, which is the reference, differs from itself by exactly zero, and any other
difference is the storage's doing. How large a difference is *large* is what the optional seed
control says (``seed_control``): the lossless fit once more with seed + 1 (other initial weights and
batch order; also another validation split when the cache has none), i.e. the change a rerun
would make with no storage error at all. It is reported beside the options, never recommended.

How a cache per option is obtained: the fit and the oracle read the source cache through
``Cache.stored_as(option)``, which passes every delta row read through the option's
``encode_block`` -> ``decode_block``, the functions the extractor's writer and the reader use. Both
options are row-local (bitround per value, int8 per row), so this gives exactly the rows a
``--storage`` cache would hold (bit for bit for bitround from a float16 cache; int8 quantizes the
float16 values rather than the float32 deltas, see ``Cache.stored_as``) without writing a copy of
the deltas per option; the bytes on disk come from ``bench store``, which does write every option.

Conventions (the pure functions below): the reference is ``lossless`` (run first; added when not
listed). FVU changes are absolute (option minus lossless); perplexity changes are relative,
``(ppl - ppl_lossless) / ppl_lossless``, and count in either direction: an option is *within
tolerance* when ``|change| <= max_ppl_change`` for every judged perplexity (default: D(E+x)). The
recommendation is the option within tolerance with the fewest bytes per token-layer (ties: the
first listed).

The command is in ``kcache/cli/bench.py``.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from kcache.bench.storage import DEFAULT_OPTIONS, bench_store
from kcache.cache.lossy import parse_storage, storage_spec

JUDGE_CHOICES = ("ekx", "oracle")
CONTROL = "lossless"  # the seed control's row is named after it: "lossless (seed N)"
PPL_LABELS = {"ekx": "D(E+x)", "oracle": "oracle", "x": "D(x)", "kx": "D(K,x)"}


@dataclasses.dataclass
class DownstreamConfig:
    """The fixed short fit and evaluation every option gets."""

    steps: int = 60  # optimizer steps of the fit (one validation at the end)
    batch_size: int = 8
    test_samples: int = 40  # held-out samples scored for perplexity
    max_ppl_change: float = 0.01  # relative, see parse_tolerance
    judge: tuple[str, ...] = ("ekx",)  # perplexities that must stay within tolerance
    seed: int = 0
    compute: str = "auto"  # fit compute precision (kcache.precision)
    token_budget: int = 4096  # evaluation batches
    device: str | None = None
    seed_control: bool = False  # also fit lossless with seed + 1: the run-to-run variation, for scale

    def __post_init__(self):
        """Refuse settings the bench cannot use, before any work."""
        self.judge = tuple(self.judge)
        if not self.judge or any(k not in JUDGE_CHOICES for k in self.judge):
            raise ValueError(f"--judge {','.join(self.judge)!r}: choose one or more of {', '.join(JUDGE_CHOICES)}")
        if not (isinstance(self.max_ppl_change, (int, float)) and math.isfinite(self.max_ppl_change)
                and self.max_ppl_change >= 0):
            raise ValueError(f"--max-ppl-change {self.max_ppl_change!r}: must be a finite fraction >= 0 "
                             "(parse_tolerance reads 1% or 0.01)")
        if self.steps < 1 or self.batch_size < 1 or self.test_samples < 1:
            raise ValueError(f"--steps {self.steps}, --batch-size {self.batch_size}, --test-samples "
                             f"{self.test_samples}: each must be at least 1")


# ---------------------------------------------------------------------------------------------
# pure pieces


def parse_tolerance(text) -> float:
    """A tolerance as typed by a user -> a fraction: ``"1%"`` -> 0.01, ``"0.5 %"`` -> 0.005, ``"0.01"``
    -> 0.01 (a bare number is a fraction). A bare number >= 1 is refused as ambiguous (is ``1`` one
    percent or a hundred?); so are negative, non-finite and unreadable values, with a ValueError
    that names ``--max-ppl-change`` and shows the accepted forms."""
    raw = str(text).strip()
    forms = "give a percentage such as 1% or 0.5%, or a fraction below 1 such as 0.01"
    percent = raw.endswith("%")
    try:
        value = float(raw[:-1].strip() if percent else raw)
    except ValueError:
        raise ValueError(f"--max-ppl-change {text!r}: not a number; {forms}") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"--max-ppl-change {text!r}: must be a finite tolerance >= 0; {forms}")
    if not percent and value >= 1:
        raise ValueError(f"--max-ppl-change {text!r}: ambiguous without a % sign ({value:g}% or {value:.0%}?); "
                         f"{forms}")
    return value / 100 if percent else value


def relative_change(value, ref) -> float | None:
    """``(value - ref) / ref``; None when either is missing or not finite, or ``ref`` is 0."""
    if value is None or ref is None or not (math.isfinite(value) and math.isfinite(ref)) or ref == 0:
        return None
    return (value - ref) / ref


def table_rows(sizes: dict, runs: dict, ref: str = "lossless") -> list[dict]:
    """One row per option that has both sizes (``bench_store``'s ``results``) and a downstream run
    (``runs[spec]``: ``val_fvu``, ``val_fvu_stored``, ``ppl`` per method), in the order of ``runs``.
    A run may name the sizes it shares with another under ``"sizes"`` (the seed control: lossless).

    Row keys: ``storage``, ``bytes_per_token_layer``, ``bytes_per_value`` (per hidden dimension),
    ``relative_rmse``, ``val_fvu``, ``val_fvu_change`` and ``val_fvu_stored_change`` (absolute, vs
    ``ref``), ``ppl`` and ``ppl_change`` (relative, vs ``ref``) per method."""
    base = runs[ref]
    rows = []
    for spec, run in runs.items():
        s = sizes.get(run.get("sizes", spec))
        if s is None:
            continue
        rows.append({
            "storage": spec,
            "bytes_per_token_layer": s["bytes_per_token_layer"],
            "bytes_per_value": s["bytes_per_value"],
            "relative_rmse": s["relative_rmse"],
            "val_fvu": run["val_fvu"],
            "val_fvu_change": run["val_fvu"] - base["val_fvu"],
            "val_fvu_stored": run["val_fvu_stored"],
            "val_fvu_stored_change": run["val_fvu_stored"] - base["val_fvu_stored"],
            "ppl": dict(run["ppl"]),
            "ppl_change": {k: relative_change(v, base["ppl"].get(k)) for k, v in run["ppl"].items()},
        })
    return rows


def recommend(rows: list[dict], max_change: float, judge=("ekx",), control: dict | None = None) -> dict:
    """The cheapest option whose judged perplexities all changed by at most ``max_change`` (relative,
    either direction) -> ``{"recommended": spec or None, "within": [specs], "not_within": {spec:
    reason}, "max_ppl_change", "judged_on"}``. Cheapest = fewest ``bytes_per_token_layer``; ties go
    to the first row. A judged change that is missing (None) counts as not within.

    ``control``: the seed control's row. When another seed alone moves a judged perplexity by at
    least ``max_change``, the verdicts on it say nothing about storage: ``"warning"`` says so."""
    within, not_within = [], {}
    for r in rows:
        reasons = []
        for k in judge:
            c = r["ppl_change"].get(k)
            if c is None:
                reasons.append(f"{PPL_LABELS.get(k, k)} perplexity not measured")
            elif abs(c) > max_change:
                reasons.append(f"{PPL_LABELS.get(k, k)} perplexity {c:+.2%} (tolerance {max_change:.2%})")
        if reasons:
            not_within[r["storage"]] = "; ".join(reasons)
        else:
            within.append(r)
    best = min(within, key=lambda r: r["bytes_per_token_layer"]) if within else None
    out = {"recommended": best["storage"] if best else None, "within": [r["storage"] for r in within],
           "not_within": not_within, "max_ppl_change": max_change, "judged_on": list(judge)}
    noisy = {k: c for k in judge if (c := (control or {}).get("ppl_change", {}).get(k)) is not None
             and abs(c) >= max_change}
    if noisy:
        out["warning"] = ("another seed alone (no storage error) moves " + ", ".join(
            f"{PPL_LABELS.get(k, k)} perplexity by {c:+.2%}" for k, c in noisy.items())
            + f", at least the tolerance {max_change:.2%}: changes this small are run-to-run variation, "
            "so the verdicts above do not rank the options")
    return out


def option_list(options, ref: str = "lossless") -> list[tuple[str, dict]]:
    """Parsed options (a bad spec is a ValueError before any work), canonical and without duplicates,
    with the reference first (added when missing)."""
    out: dict[str, dict] = {}
    for o in (ref, *options):
        st = parse_storage(o)
        out.setdefault(storage_spec(st), st)
    return list(out.items())


# ---------------------------------------------------------------------------------------------
# measuring one option


def held_out(samples, cache, n: int):
    """The first ``n`` samples of the cache's ``test`` split, in samples-file order, without their
    answer options (only the target's perplexity is scored). ValueError when the file holds none."""
    import pyarrow as pa

    from kcache.data.samples import read_samples

    table = samples if isinstance(samples, pa.Table) else read_samples(samples)
    splits = cache.index["split"].to_pylist()
    test = {sid for sid, s in zip(cache.index["sample_id"].to_pylist(), splits) if s == "test"}
    keep = [i for i, sid in enumerate(table["id"].to_pylist()) if sid in test][:n]
    if not keep:
        raise ValueError(f"the samples hold none of the {len(test)} test samples of {cache.location}; pass the "
                         "samples file the cache was extracted from (--samples)")
    table = table.take(keep)
    return table.drop_columns([c for c in ("options", "label") if c in table.column_names])


def _fvu_against(cache, bundle: Path, cfg, device) -> dict[int, float]:
    """Per-layer validation FVU of the bundle's encoders against ``cache``'s own deltas (the
    lossless ones), on the validation samples and batches the fit used."""
    import torch

    from kcache.encoders import load_bundle
    from kcache.fit import BatchLoader, CacheReader, evaluate_layers, split_samples
    from kcache.precision import autocast_for

    stack, _ = load_bundle(bundle)
    stack.to(device)
    _, val = split_samples(cache, cfg.val_fraction, cfg.seed)
    loader = BatchLoader(CacheReader(cache, stack.layers), val[: cfg.val_max_samples], cfg.batch_size,
                         cfg.buffer_samples, cfg.seed, 0, shuffle=False)
    try:
        # The mean only feeds a baseline column that is not read here.
        zeros = {l: torch.zeros(cache.hidden_size, device=device) for l in stack.layers}
        autocast = autocast_for(device, cfg.compute)
        res = evaluate_layers(stack, cache.embeddings().to(device), loader, device, zeros, autocast)
    finally:
        loader.close()
    return {l: r["fvu"] for l, r in res.items()}


def _perplexities(decoder, table, bundle: Path, view, methods, token_budget: int) -> dict[str, float]:
    """Perplexity of each method on ``table`` with the bundle's encoders and ``view`` as the oracle."""
    from kcache.evaluate import evaluate

    res = evaluate(decoder, table, bundle, methods, cache=view, token_budget=token_budget, controls=False)
    return {m: res["results"]["all"][m]["perplexity"] for m in methods}


def run_option(cache, st: dict, decoder, table, fit_cfg, dcfg: DownstreamConfig, tmp: Path, methods,
               progress: bool, name: str | None = None) -> dict:
    """Fit on ``cache`` read as ``st`` stores it, then measure: ``val_fvu`` / ``val_fvu_stored`` (mean
    over layers, and ``per_layer``), ``ppl`` per method, ``fit_seconds`` and ``seconds`` (all of it)."""
    import torch

    from kcache.fit import fit_encoders

    t0 = time.perf_counter()
    view = cache.stored_as(st)
    out = tmp / (name or storage_spec(st)).replace(":", "-").replace(" ", "-")
    summary = fit_encoders(view, out, fit_cfg, progress=progress)
    device = torch.device(dcfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    true = _fvu_against(cache, out, fit_cfg, device)
    stored = {int(l): v["val_fvu"] for l, v in summary["layers"].items()}
    ppl = _perplexities(decoder, table, out, view, methods, dcfg.token_budget)
    shutil.rmtree(out, ignore_errors=True)
    return {"storage": st, "steps": summary["steps"], "fit_seconds": summary["wall_seconds"],
            "seconds": time.perf_counter() - t0,
            "val_fvu": float(np.mean(list(true.values()))), "val_fvu_stored": float(np.mean(list(stored.values()))),
            "per_layer": {str(l): {"val_fvu": true[l], "val_fvu_stored": stored[l]} for l in true}, "ppl": ppl}


# ---------------------------------------------------------------------------------------------
# the bench


def bench_store_downstream(cache_path, samples, decoder=None, model: str | None = None, model_dtype: str | None = None,
                           options=DEFAULT_OPTIONS, rows: int = 200_000, repeats: int = 3,
                           cfg: DownstreamConfig | None = None, out_json=None, out_png=None, tmp_dir=None,
                           progress: bool = True, log=print) -> dict:
    """``bench_store`` (bytes, MB/s, raw error) plus, per option, the validation FVU after a short
    fixed fit and the D(E+x) and oracle perplexities, each against lossless, and the recommendation
    for ``cfg.max_ppl_change``. ``decoder``: an already loaded decoder (else ``model``, default the
    model the cache names). Returns (and writes to ``out_json`` / ``out_png``) ``bench_store``'s
    result with a ``downstream`` entry: ``config``, ``runs`` per option, ``rows`` (``table_rows``)
    and ``recommendation`` (``recommend``)."""
    import torch
    from tqdm.auto import tqdm

    from kcache.cache.reader import Cache
    from kcache.fit import FitConfig
    from kcache.inject import check_fingerprint
    from kcache.precision import compute_name

    cfg = cfg or DownstreamConfig()
    specs = option_list(options)  # bad specs fail before any work (bad settings did in DownstreamConfig)
    cache = Cache.open(cache_path)
    cache.stored_as({"kind": "lossless"})  # refuses a lossy source cache before any work
    table = held_out(samples, cache, cfg.test_samples)
    if decoder is None:
        from kcache.models import load_decoder

        decoder = load_decoder(model or cache.model_fingerprint.get("name") or "smollm2-135m", device=cfg.device,
                               dtype=model_dtype)
    check_fingerprint(cache.model_fingerprint, decoder, f"cache {cache_path}")
    t0 = time.perf_counter()
    res = bench_store(cache_path, rows, [s for s, _ in specs], None, None, repeats=repeats, tmp_dir=tmp_dir,
                      progress=progress, log=log)
    sizes_seconds = time.perf_counter() - t0
    fit_cfg = FitConfig(epochs=10**6, batch_size=cfg.batch_size, max_steps=cfg.steps, eval_every=cfg.steps,
                        checkpoint_every=10**9, seed=cfg.seed, compute=cfg.compute, device=cfg.device)
    runs: dict[str, dict] = {}
    tmp = Path(tempfile.mkdtemp(prefix="kcache-downstream-", dir=tmp_dir))
    bar = tqdm([(s, st) for s, st in specs if s in res["results"]], desc="bench store --downstream",
               disable=not progress)
    try:
        for spec, st in bar:
            bar.set_postfix_str(spec)
            # D(x) and D(K,x) once, beside the reference, to place its perplexities.
            methods = ("x", "kx", "ekx", "oracle") if spec == "lossless" else ("ekx", "oracle")
            runs[spec] = run_option(cache, st, decoder, table, fit_cfg, cfg, tmp, methods, progress)
        if cfg.seed_control:
            name = f"{CONTROL} (seed {cfg.seed + 1})"
            ctrl = dataclasses.replace(fit_cfg, seed=cfg.seed + 1)
            runs[name] = run_option(cache, {"kind": "lossless"}, decoder, table, ctrl, cfg, tmp, ("ekx", "oracle"),
                                    progress, name) | {"sizes": "lossless", "control": True}
    finally:
        bar.close()
        shutil.rmtree(tmp, ignore_errors=True)
    for r in res["results"].values():
        r["bytes_per_value"] = r["bytes_per_token_layer"] / res["hidden"]
    table_ = table_rows(res["results"], runs)
    options_ = [r for r in table_ if not runs[r["storage"]].get("control")]
    control = next((r for r in table_ if runs[r["storage"]].get("control")), None)
    res["downstream"] = {
        "config": dataclasses.asdict(cfg) | {"fit": fit_cfg.run_config(),
                                             "samples": "<table>" if hasattr(samples, "num_rows") else str(samples)},
        "model": decoder.fingerprint.to_dict(), "model_dtype": str(decoder.dtype).removeprefix("torch."),
        "fit_compute": compute_name(cfg.compute, cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")),
        "held_out": table["id"].to_pylist(), "runs": runs, "rows": table_,
        "seconds": {"sizes": sizes_seconds, "total": time.perf_counter() - t0},
        "recommendation": recommend(options_, cfg.max_ppl_change, cfg.judge, control),
    }
    report(res, out_json, out_png, log)
    return res


# ---------------------------------------------------------------------------------------------
# output


def _pct(v) -> str:
    return "n/a" if v is None else f"{v:+.2%}"


def format_downstream_table(res: dict) -> str:
    """The combined table (one row per option) and the recommendation, as printed and in docs."""
    d = res["downstream"]
    rec, c = d["recommendation"], d["config"]
    ref = d["runs"]["lossless"]["ppl"]
    head = (f"bench store --downstream: {res['cache']}, sizes on {res['rows']} rows x {len(res['layers'])} layers x "
            f"hidden {res['hidden']}; fit {c['steps']} steps, batch {c['batch_size']}, seed {c['seed']}; perplexity "
            f"on {len(d['held_out'])} held-out samples ({d['model'].get('name')}, {d['model_dtype']}; fit compute "
            f"{d.get('fit_compute', c['compute'])}); lossless: "
            f"D(x) {ref.get('x', float('nan')):.2f}, D(K,x) {ref.get('kx', float('nan')):.2f}")
    lines = [head, "",
             "| storage | bytes/token-layer | bytes/dim | ratio vs f16 | write MB/s | read MB/s | relative RMSE | "
             "val FVU (change) | FVU on stored targets (change) | D(E+x) ppl (change) | oracle ppl (change) | "
             f"within {rec['max_ppl_change']:.2%} |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in d["rows"]:
        run = d["runs"][r["storage"]]
        s = res["results"][run.get("sizes", r["storage"])]
        ok = "control" if run.get("control") else "yes" if r["storage"] in rec["within"] else "no"
        lines.append(
            f"| {r['storage']} | {r['bytes_per_token_layer']:.1f} | {r['bytes_per_value']:.3f} | "
            f"{s['ratio_vs_float16']:.2f}x | {s['write_mb_per_s']:.0f} | {s['read_mb_per_s']:.0f} | "
            f"{r['relative_rmse']:.2e} | {r['val_fvu']:.4f} ({r['val_fvu_change']:+.4f}) | "
            f"{r['val_fvu_stored']:.4f} ({r['val_fvu_stored_change']:+.4f}) | "
            f"{r['ppl']['ekx']:.2f} ({_pct(r['ppl_change']['ekx'])}) | "
            f"{r['ppl']['oracle']:.2f} ({_pct(r['ppl_change']['oracle'])}) | {ok} |")
    judged = " and ".join(PPL_LABELS[k] for k in rec["judged_on"])
    if rec["recommended"]:
        lines += ["", f"recommended: {rec['recommended']} (fewest bytes with {judged} perplexity within "
                      f"{rec['max_ppl_change']:.2%} of lossless)"]
    else:
        lines += ["", f"recommended: none (no option keeps {judged} perplexity within {rec['max_ppl_change']:.2%})"]
    lines += [f"  not within: {s}: {why}" for s, why in rec["not_within"].items()]
    if rec.get("warning"):
        lines.append(f"  WARNING: {rec['warning']}")
    for r in d["rows"]:
        if d["runs"][r["storage"]].get("control"):
            lines.append(f"  seed control: {r['storage']} moves D(E+x) perplexity by {_pct(r['ppl_change']['ekx'])} "
                         f"and val FVU by {r['val_fvu_change']:+.4f} with no storage error at all")
    if "seconds" in d:
        per = ", ".join(f"{k} {v['seconds']:.0f}" for k, v in d["runs"].items())
        lines.append(f"  time: sizes {d['seconds']['sizes']:.0f} s; fit + scoring per option (s): {per}; "
                     f"total {d['seconds']['total']:.0f} s")
    return "\n".join(lines)


def report(res: dict, out_json, out_png, log) -> None:
    """Log the table; write the JSON and the PNG when asked."""
    from kcache._io import atomic_write_json

    log(format_downstream_table(res))
    if out_json:
        out_json = Path(out_json)
        out_json.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out_json, res, indent=2)
        log(f"  wrote {out_json}")
    if out_png:
        plot_downstream_png(res, Path(out_png))
        log(f"  wrote {out_png}")


def plot_downstream_png(res: dict, path: Path) -> None:
    """Three panels over the options: bytes per token-layer, perplexity change vs lossless (D(E+x)
    and oracle, with the tolerance band) and validation FVU change vs lossless."""
    from kcache._io import pyplot, save_png

    d = res["downstream"]
    rows, rec = d["rows"], d["recommendation"]
    specs = [r["storage"] for r in rows]
    x = np.arange(len(specs))
    fig, (a, b, c) = pyplot().subplots(1, 3, figsize=(15, 4.2))
    colors = ["#4a7" if s == rec["recommended"] else "#aaa" if d["runs"][s].get("control") else "#47a"
              for s in specs]
    bars = a.bar(x, [r["bytes_per_token_layer"] for r in rows], color=colors)
    a.bar_label(bars, fmt="%.0f", fontsize=7)
    for level, label in ((2 * res["hidden"], "raw float16"), (0.5 * res["hidden"], "0.5 byte/dim")):
        a.axhline(level, color="#888", ls="--", lw=1)
        a.text(0.99, level, label, transform=a.get_yaxis_transform(), ha="right", va="bottom", fontsize=7)
    a.set(ylabel="bytes per token-layer on disk", title="size (green: recommended, grey: seed control)")
    tol = 100 * rec["max_ppl_change"]
    for k, off, col in (("ekx", -0.2, "#47a"), ("oracle", 0.2, "#a74")):
        vals = [100 * (r["ppl_change"].get(k) or 0.0) for r in rows]
        b.bar(x + off, vals, 0.4, label=f"{PPL_LABELS[k]}", color=col)
    b.axhspan(-tol, tol, color="#4a7", alpha=0.12, label=f"within {tol:g} %")
    b.axhline(0, color="#444", lw=0.8)
    b.set(ylabel="perplexity change vs lossless (%)", title=f"perplexity, {len(d['held_out'])} held-out samples")
    b.legend(fontsize=7)
    c.bar(x - 0.2, [r["val_fvu_change"] for r in rows], 0.4, label="vs lossless targets", color="#47a")
    c.bar(x + 0.2, [r["val_fvu_stored_change"] for r in rows], 0.4, label="vs stored targets", color="#a74")
    c.axhline(0, color="#444", lw=0.8)
    c.set(ylabel="validation FVU change vs lossless", title=f"fit: {d['config']['steps']} steps, same seed")
    c.legend(fontsize=7)
    for ax in (a, b, c):
        ax.set_xticks(x, specs, rotation=25, fontsize=8)
        ax.grid(alpha=0.3, axis="y")
    save_png(fig, path)
