"""``kcache bench extract``, ``bench fit`` and ``bench finetune``: the stages measured side by side.

Every figure comes from one run on the same samples, so ratios compare like with like. Results
are printed, written as JSON, and drawn as a PNG next to the JSON.

The commands are in ``kcache/cli/bench.py``.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from kcache.align import length_mask, pad_right, shift_left


def _write_result(out: Path, res: dict, title: str, labels: list[str], values: list[float], unit: str, log) -> None:
    """``res`` as JSON at ``out`` and a horizontal bar chart of ``values`` beside it (``.png``)."""
    from kcache._io import atomic_write_json, pyplot, save_png

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, res, indent=2)
    fig, ax = pyplot().subplots(figsize=(7, 3.2))
    bars = ax.barh(labels, values, color=["#888", "#4a7", "#47a", "#a74"][: len(values)])
    ax.bar_label(bars, fmt="%.2f")
    ax.set(title=title, xlabel=unit)
    ax.invert_yaxis()
    save_png(fig, out.with_suffix(".png"))
    log(f"  wrote {out} and {out.with_suffix('.png')}")


def _target(met: bool, target: str) -> str:
    """``(target <= 0.40: met)`` for a printed figure."""
    return f"(target {target}: {'met' if met else 'NOT met'})"


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _batches(decoder, plan):
    """(items, padded pass-A ids/mask, padded pass-B ids/mask) per planned batch."""
    pad = decoder.tokenizer.pad_token_id or 0
    for b in plan.batches:
        items = [plan.encoded[i] for i in b]
        yield items, pad_right([e.x_ids for e in items], pad), pad_right([e.k_ids + e.x_ids for e in items], pad)


@torch.inference_mode()
def _full_depth(decoder, plan, layers) -> float:
    """The reference approach: whole model, ``output_hidden_states=True``, both passes, then the
    shifted differences of the requested layers (block outputs; ``hidden_states[l + 1]``)."""
    dev = decoder.device
    _sync(dev)
    t0 = time.perf_counter()
    for items, (ids_a, m_a), (ids_b, m_b) in _batches(decoder, plan):
        ha = decoder.model(input_ids=ids_a.to(dev), attention_mask=m_a.to(dev), output_hidden_states=True,
                           use_cache=False).hidden_states
        hb = decoder.model(input_ids=ids_b.to(dev), attention_mask=m_b.to(dev), output_hidden_states=True,
                           use_cache=False).hidden_states
        k = torch.tensor([len(e.k_ids) for e in items], device=dev)
        valid = length_mask(torch.tensor([len(e.x_ids) for e in items], device=dev))
        for l in layers:
            d = shift_left(hb[l + 1].float(), k, ids_a.shape[1]) - ha[l + 1].float()
            d[valid].to(torch.float16).cpu()
    _sync(dev)
    return time.perf_counter() - t0


@torch.inference_mode()
def _bare(decoder, plan, layers, site) -> float:
    """Only the truncated forward passes kcache runs (blocks 0..max(layers), hooks), no deltas, no I/O."""
    from kcache.extract import capture, run_blocks

    dev = decoder.device
    _sync(dev)
    t0 = time.perf_counter()
    for _items, (ids_a, m_a), (ids_b, m_b) in _batches(decoder, plan):
        with capture(decoder, site, layers):
            run_blocks(decoder, ids_a.to(dev), m_a.to(dev))
            run_blocks(decoder, ids_b.to(dev), m_b.to(dev))
    _sync(dev)
    return time.perf_counter() - t0


def bench_extract(model: str = "smollm2-135m", n: int = 300, layers: str = "3-8", site: str = "block",
                  token_budget: int = 8192,
                  device: str | None = None, model_dtype: str | None = None, out: Path | None = None, repeats: int = 1,
                  decoder=None, log=print) -> dict:
    """Time full-depth extraction (reference), kcache extraction, and bare truncated passes."""
    from kcache.align import parse_layers
    from kcache.data.synth import synth_samples
    from kcache.extract import ExtractConfig, extract, make_plan, useful_fraction
    from kcache.models import load_decoder

    dec = decoder or load_decoder(model, device=device, dtype=model_dtype)
    samples = synth_samples(n, seed=1)
    cfg = ExtractConfig(layers=layers, site=site, token_budget=token_budget)
    lay = parse_layers(layers, dec.layers.num_layers)
    plan = make_plan(dec.tokenizer, samples, cfg)
    tokens_a = int(sum(len(e.x_ids) for e in plan.encoded))
    tokens_b = int(sum(len(e.k_ids) + len(e.x_ids) for e in plan.encoded))
    _bare(dec, make_plan(dec.tokenizer, samples.slice(0, min(16, n)), cfg), lay, site)  # warm-up

    times = {"full_depth_hidden_states": [], "kcache_extract": [], "bare_truncated_passes": []}
    tmp = Path(tempfile.mkdtemp(prefix="kcache-bench-"))
    try:
        for _ in range(repeats):
            times["full_depth_hidden_states"].append(_full_depth(dec, plan, lay))
            shutil.rmtree(tmp / "c.zarr", ignore_errors=True)
            _sync(dec.device)
            t0 = time.perf_counter()
            extract(dec, samples, tmp / "c.zarr", cfg, progress=False)
            _sync(dec.device)
            times["kcache_extract"].append(time.perf_counter() - t0)
            times["bare_truncated_passes"].append(_bare(dec, plan, lay, site))
        cache_bytes = sum(f.stat().st_size for f in (tmp / "c.zarr").rglob("*") if f.is_file())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    best = {k: min(v) for k, v in times.items()}
    res = {
        "model": dec.fingerprint.name or model, "device": str(dec.device),
        "model_dtype": str(dec.dtype).replace("torch.", ""),
        "torch_threads": torch.get_num_threads(), "samples": n, "layers": lay,
        "num_model_layers": dec.layers.num_layers,
        "site": site, "token_budget": token_budget, "batches": len(plan.batches), "tokens_pass_a": tokens_a,
        "tokens_pass_b": tokens_b, "seconds": best, "all_seconds": times,
        "ratio_kcache_vs_full_depth": best["kcache_extract"] / best["full_depth_hidden_states"],
        "ratio_kcache_vs_bare": best["kcache_extract"] / best["bare_truncated_passes"],
        # Each extraction against the bare passes run right after it: the two bests above can come
        # from minutes apart, and this machine's speed drifts by more than the gap being measured.
        "ratios_kcache_vs_bare_paired": [a / b for a, b in zip(times["kcache_extract"],
                                                               times["bare_truncated_passes"])],
        "useful_token_fraction": useful_fraction(plan),
        "tokens_per_second": (tokens_a + tokens_b) / best["kcache_extract"],
        "input_tokens_per_second": tokens_a / best["kcache_extract"],
        "cache_bytes": cache_bytes,
        "targets": {"ratio_kcache_vs_full_depth": 0.40, "ratio_kcache_vs_bare": 1.10, "useful_token_fraction": 0.90},
    }
    res["targets_met"] = {
        "ratio_kcache_vs_full_depth": res["ratio_kcache_vs_full_depth"] <= 0.40,
        "ratio_kcache_vs_bare": res["ratio_kcache_vs_bare"] <= 1.10,
        "useful_token_fraction": res["useful_token_fraction"] >= 0.90,
    }
    log(f"bench extract: {res['model']} on {res['device']} ({res['model_dtype']}, "
        f"{res['torch_threads']} threads), {n} samples, "
        f"layers {layers} of {res['num_model_layers']}, {len(plan.batches)} batches, {tokens_a}+{tokens_b} tokens")
    for k, v in best.items():
        log(f"  {k:28s} {v:8.2f} s")
    met = res["targets_met"]
    log(f"  kcache / full depth          {res['ratio_kcache_vs_full_depth']:.3f}x  "
        + _target(met["ratio_kcache_vs_full_depth"], "<= 0.40"))
    log(f"  kcache / bare passes         {res['ratio_kcache_vs_bare']:.3f}x  "
        + _target(met["ratio_kcache_vs_bare"], "<= 1.10"))
    if repeats > 1:
        paired = sorted(res["ratios_kcache_vs_bare_paired"])
        log(f"    ... each run against the next: median {float(np.median(paired)):.3f}x "
            f"({', '.join(f'{r:.3f}' for r in paired)})")
    log(f"  useful tokens in batches     {res['useful_token_fraction']:.1%}  "
        + _target(met["useful_token_fraction"], ">= 90%"))
    log(f"  throughput                   {res['tokens_per_second']:.0f} tokens/s through the decoder "
        f"({res['input_tokens_per_second']:.0f} input tokens/s cached)")
    if out:
        _write_result(out, res, f"stage one on {res['model']} ({res['device']}), {n} samples",
                      ["full depth + hidden states", "kcache extract", "bare truncated passes"], list(best.values()),
                      "seconds", log)
    return res


def bench_extract_dtypes(model: str, dtypes: tuple[str, ...], n: int = 300, layers: str = "3-8",
                         site: str = "block", token_budget: int = 8192, device: str | None = None,
                         out: Path | None = None, repeats: int = 1, log=print) -> dict:
    """``bench_extract`` with the decoder in each of ``dtypes`` (``auto`` = the default), one after the
    other in one process on the same samples; the whole extraction of the first against the last."""
    from kcache.models import load_decoder

    runs = {}
    for d in dtypes:
        dec = load_decoder(model, device=device, dtype=None if d == "auto" else d)
        runs[d] = bench_extract(model, n, layers, site, token_budget, device, d, None, repeats, decoder=dec, log=log)
        del dec
    first, last = runs[dtypes[0]], runs[dtypes[-1]]
    ratio = first["seconds"]["kcache_extract"] / last["seconds"]["kcache_extract"]
    res = {"model": model, "dtypes": list(dtypes), "runs": runs, "target_ratio": 0.5,
           f"ratio_{dtypes[0]}_vs_{dtypes[-1]}": ratio}
    log(f"bench extract: whole extraction, decoder {dtypes[0]} ({first['model_dtype']}) vs {dtypes[-1]} "
        f"({last['model_dtype']}): {ratio:.3f}x " + _target(ratio <= 0.5, "<= 0.50") + "; "
        f"{dtypes[0]} vs its own bare passes {first['ratio_kcache_vs_bare']:.3f}x (target <= 1.10)")
    if out:
        _write_result(out, res, f"stage one on {model}: whole extraction per decoder dtype",
                      [f"kcache extract, {d} ({runs[d]['model_dtype']})" for d in dtypes],
                      [runs[d]["seconds"]["kcache_extract"] for d in dtypes], "seconds", log)
    return res


def _fit_run(cache: Path, steps: int, batch_size: int, device: str | None, compute: str, **read) -> dict:
    """``steps`` training steps from a fresh start, one validation at the end (``read``: how to read the
    cache, ``verify`` / ``stream_buffer_mb``)."""
    from kcache.fit import FitConfig, fit_encoders

    tmp = Path(tempfile.mkdtemp(prefix="kcache-benchfit-"))
    stamps: dict[int, float] = {}
    try:
        cfg = FitConfig(epochs=100, batch_size=batch_size, max_steps=steps, eval_every=steps, checkpoint_every=10**9,
                        device=device, compute=compute, **read)
        t0 = time.perf_counter()
        s = fit_encoders(cache, tmp / "enc", cfg, progress=False,
                         on_step=lambda k: stamps.setdefault(k, time.perf_counter()))
        total = time.perf_counter() - t0  # with opening the cache, the embeddings and the train-mean baseline
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    fvu = {l: v["val_fvu"] for l, v in s["layers"].items()}
    # the steps alone, as bench finetune: from the end of step 1 to the end of step steps-1 (before the
    # last validation, checkpoint and plot, which ``seconds`` includes)
    timed = s["steps"] - 2
    step_rate = timed / (stamps[s["steps"] - 1] - stamps[1]) if timed > 0 else None  # JSON has no NaN
    return {"compute": compute, "steps": s["steps"], "seconds": s["wall_seconds"], "total_seconds": total,
            "steps_per_second": s["steps"] / s["wall_seconds"], "steps_only_per_second": step_rate,
            "tokens_per_second": s["tokens_per_second"],
            "data_wait_fraction": s["data_wait_seconds"] / s["wall_seconds"],
            "val_fvu": fvu, "val_fvu_mean": sum(fvu.values()) / len(fvu)}


def bench_fit(cache: Path, steps: int = 60, batch_size: int = 8, device: str | None = None, out: Path | None = None,
              log=print, computes: tuple[str, ...] = ("float32", "auto"), sources: tuple[str, ...] = (),
              stream_buffer_mb: int = 512) -> dict:
    """Loader alone (tokens/s, MB/s) vs training steps in each compute precision, run one after the other on
    the same cache, batches and seed: steps/s, the fraction of time waiting for data, and the validation FVU
    after the same number of steps (the speed must not cost accuracy). ``sources``: the same loader and a fit
    in the last precision with the cache read locally, verified, over loopback HTTP, pulled
    (kcache.bench.stream; ``res["stream"]``, a second PNG ``<out>-sources.png``)."""
    import numpy as np

    from kcache.cache.reader import Cache
    from kcache.fit import BatchLoader, CacheReader
    from kcache.precision import compute_name

    c = Cache.open(cache)
    reader = CacheReader(c, c.layers)
    train = np.nonzero(np.array(c.index["split"].to_pylist()) == "train")[0]
    t0 = time.perf_counter()
    loader = BatchLoader(reader, train, batch_size, 2048, 0, 0)
    tokens = batches = 0
    for b in loader:
        tokens += int(b.valid.sum())
        batches += 1
    load_s = time.perf_counter() - t0
    mb = reader.bytes_read / 2**20
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    runs = [_fit_run(cache, steps, batch_size, device, comp) | {"resolved": compute_name(comp, dev)}
            for comp in computes]
    base, last = runs[0], runs[-1]
    res = {
        "cache": str(cache), "layers": c.layers, "batch_size": batch_size, "device": dev,
        "threads": torch.get_num_threads(),
        "loader_tokens_per_second": tokens / load_s, "loader_mb_per_second": mb / load_s, "loader_seconds": load_s,
        "loader_batches": batches, "runs": runs, "speedup": last["steps_per_second"] / base["steps_per_second"],
        "speedup_steps_only": (last["steps_only_per_second"] / base["steps_only_per_second"]
                               if last["steps_only_per_second"] and base["steps_only_per_second"] else None),
        "fvu_change": last["val_fvu_mean"] - base["val_fvu_mean"],
        # kept for readers of the earlier format: the default (last) run's figures
        "train_steps": last["steps"], "train_seconds": last["seconds"],
        "train_tokens_per_second": last["tokens_per_second"],
        "steps_per_second": last["steps_per_second"], "data_wait_fraction": last["data_wait_fraction"],
        "target_data_wait_fraction": 0.10,
    }
    res["target_met"] = res["data_wait_fraction"] <= 0.10
    log(f"bench fit: {cache} layers {c.layers}, batch {batch_size}, {steps} steps per run, {res['threads']} thread(s)")
    log(f"  loader alone     {res['loader_tokens_per_second']:9.0f} tokens/s  {res['loader_mb_per_second']:7.1f} MB/s "
        "of stored deltas, uncompressed")
    for r in runs:
        log(f"  compute {r['compute']:>8} ({r['resolved']:>8})  {r['tokens_per_second']:9.0f} tokens/s  "
            f"{r['steps_per_second']:.2f} steps/s ({r['steps_only_per_second'] or float('nan'):.2f} steps alone)  "
            f"data wait {r['data_wait_fraction']:.1%}  val "
            f"FVU {r['val_fvu_mean']:.4f}")
    if len(runs) > 1:
        log(f"  {last['compute']} vs {base['compute']}: {res['speedup']:.2f}x steps/s "
            f"({res['speedup_steps_only'] or float('nan'):.2f}x the steps alone), "
            f"mean val FVU {res['fvu_change']:+.4f}")
    log(f"  waiting for data {res['data_wait_fraction']:.1%} of training time " + _target(res["target_met"], "<= 10%"))
    if sources:
        from kcache.bench.stream import bench_sources, plot_sources

        def fit_run(spec, **read):
            return _fit_run(spec, steps, batch_size, device, last["compute"], **read)

        res["stream"] = bench_sources(cache, sources, fit_run, batch_size, stream_buffer_mb, log, local_fit=last)
        if out:
            plot_sources(Path(out).with_name(Path(out).stem + "-sources.png"), res["stream"])
    if out:
        _write_result(out, res, "stage two: tokens/s", ["loader alone"] + [f"training ({r['resolved']})" for r in runs],
                      [res["loader_tokens_per_second"]] + [r["tokens_per_second"] for r in runs], "tokens / s", log)
    return res


def _finetune_run(model: str, dtype: str, samples, encoders, steps: int, batch_size: int, layers: str,
                  device: str | None) -> dict:
    """``steps`` finetune steps with the decoder loaded in ``dtype`` (``auto``: the default) and the
    default compute for it; seconds per step from the steps alone (no validation, no loading)."""
    from kcache.finetune import FinetuneConfig, finetune
    from kcache.models import load_decoder
    from kcache.precision import compute_name

    dec = load_decoder(model, device=device, dtype=None if dtype == "auto" else dtype)
    tmp = Path(tempfile.mkdtemp(prefix="kcache-benchft-"))
    stamps: dict[int, float] = {}
    try:
        cfg = FinetuneConfig(batch_size=batch_size, max_steps=steps, eval_every=steps, checkpoint_every=10**9,
                             val_max_samples=32, from_scratch=encoders is None, layers=layers,
                             compute="auto" if dtype == "auto" else "float32")
        s = finetune(dec, samples, encoders, tmp / "ft", cfg, progress=False,
                     on_step=lambda k: stamps.setdefault(k, time.perf_counter()))
        end = json.loads((tmp / "ft" / "history.json").read_text())[-1]["val_nll"]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    timed = steps - 2  # from the end of step 1 (warm) to the end of step steps-1 (before the last validation)
    per_step = (stamps[steps - 1] - stamps[1]) / timed
    return {"model_dtype": str(dec.dtype).removeprefix("torch."),
            "compute": compute_name(cfg.compute, dec.device, dec.dtype), "steps": s["steps"],
            "seconds_per_step": per_step, "val_nll_start": s["val_nll_start"], "val_nll_end": end}


def bench_finetune(model: str = "smollm2-135m", n: int = 240, steps: int = 12, batch_size: int = 8,
                   encoders: Path | None = None, layers: str = "3-8", dtypes: tuple[str, ...] = ("float32", "auto"),
                   device: str | None = None, out: Path | None = None, log=print) -> dict:
    """Finetune steps with the decoder in each dtype (first = baseline), one after the other on the same
    samples, batches and seed: seconds per step and the validation NLL after the same number of steps."""
    from kcache.data.synth import synth_samples

    samples = synth_samples(n, seed=1)
    runs = [_finetune_run(model, d, samples, encoders, steps, batch_size, layers, device) | {"dtype": d}
            for d in dtypes]
    base, last = runs[0], runs[-1]
    res = {"model": model, "samples": n, "steps": steps, "batch_size": batch_size, "layers": layers,
           "encoders": str(encoders) if encoders else "fresh (from scratch)", "threads": torch.get_num_threads(),
           "runs": runs, "ratio_seconds_per_step": last["seconds_per_step"] / base["seconds_per_step"],
           "val_nll_change": last["val_nll_end"] - base["val_nll_end"], "target_ratio": 0.40}
    log(f"bench finetune: {model}, {n} samples, batch {batch_size}, {steps} steps per run, layers {layers}, "
        f"{res['threads']} thread(s), encoders {res['encoders']}")
    for r in runs:
        log(f"  decoder {r['dtype']:>8} ({r['model_dtype']:>8}, compute {r['compute']:>8})  "
            f"{r['seconds_per_step']:.3f} s/step  val NLL {r['val_nll_start']:.4f} -> {r['val_nll_end']:.4f}")
    log(f"  {last['dtype']} vs {base['dtype']}: {res['ratio_seconds_per_step']:.2f}x seconds per step "
        + _target(res["ratio_seconds_per_step"] <= 0.40, "<= 0.40") + f", val NLL {res['val_nll_change']:+.4f}")
    if out:
        _write_result(out, res, f"finetune on {model}: seconds per step",
                      [f"decoder {r['dtype']} ({r['model_dtype']})" for r in runs],
                      [r["seconds_per_step"] for r in runs], "seconds / step", log)
    return res
