"""``kcache bench inject``: the cost of reading knowledge through encoders, ``D(E(K, x) + x)``
(encoders over ``K + x``, decoder over ``x``), against reading it in context, ``D(K, x)`` (decoder
over ``K + x``), as ``|K|`` grows with ``x`` fixed. Both compute logits for the ``x`` positions only
(``logits_to_keep``) without a KV cache, so the baseline is not charged for work it does not
need. Measurements are interleaved (baseline, injected, baseline, ...) in one process and the
median of the repeats is reported, so ratios are taken side by side under the same conditions.

The command is in ``kcache/cli/bench.py``.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

TIME_TARGET = 0.5  # injected / in-context wall time at >= 512 knowledge tokens
MEMORY_TARGET = 0.75  # injected / in-context peak memory at >= 512 knowledge tokens


def _bench_tokens(tokenizer, n_knowledge: int, n_input: int, seed: int = 0) -> tuple[list[int], list[int]]:
    """Knowledge ids of exactly ``n_knowledge`` tokens (synthetic facts, repeated) and input ids of
    exactly ``n_input`` tokens (a synthetic question and answer, padded with more text)."""
    from kcache.data.synth import synth_records

    recs = synth_records(64, seed=seed)
    text = " ".join(k for r in recs for k in r["knowledge"])
    k = tokenizer(text, add_special_tokens=False)["input_ids"]
    while len(k) < n_knowledge:
        k = k + k
    q = " ".join(r["source"] + r["target"] for r in recs)
    x = tokenizer(q, add_special_tokens=True)["input_ids"]
    while len(x) < n_input:
        x = x + x
    return k[:n_knowledge], x[:n_input]


def _param_bytes(module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def bench_inject(
    decoder=None,
    model: str = "smollm2-135m",
    device: str | None = None,
    sizes: tuple[int, ...] = (64, 128, 256, 512, 1024),
    input_tokens: int = 32,
    layers: list[int] | str = "3-8",
    stack=None,
    repeats: int = 5,
    warmup: int = 1,
    memory_repeats: int = 3,
    threads: int | None = None,
    out: str | Path | None = None,
    echo=print,
) -> dict:
    """Time and peak memory of ``D(K,x)`` vs ``D(E(K,x)+x)`` per knowledge size -> result dict
    (also written as ``bench-inject.json`` and ``bench-inject.png`` into ``out``).

    ``stack``: an ``EncoderStack`` (default: a freshly initialised one with the default encoder
    config on ``layers``; weights do not change the cost). Peak memory is measured above the
    level before the call (``PeakMemory``); ``total`` adds the resident parameters (decoder, plus
    encoders for the injected run). ``threads``: torch intra-op threads for the run (CPU).
    """
    import torch

    prev_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _bench_inject(decoder, model, device, sizes, input_tokens, layers, stack, repeats, warmup,
                             memory_repeats, out, echo)
    finally:
        torch.set_num_threads(prev_threads)


def _bench_inject(decoder, model, device, sizes, input_tokens, layers, stack, repeats, warmup, memory_repeats, out,
                  echo) -> dict:
    import torch

    from kcache.align import parse_layers
    from kcache.encoders import EncoderConfig, EncoderStack
    from kcache.inject import Injector
    from kcache.models import load_decoder

    if decoder is None:
        decoder = load_decoder(model, device=device)
    dev = decoder.device
    if stack is None:
        layer_list = parse_layers(layers, decoder.layers.num_layers)
        stack = EncoderStack(EncoderConfig(d_model=decoder.layers.hidden_size), layer_list)
    inj = Injector.from_stack(decoder, stack, {"site": "mlp", "layers": stack.layers})
    stack.to(dev)
    runners = _runners(decoder, stack, inj)

    dec_params, enc_params = _param_bytes(decoder.model), _param_bytes(stack)
    rows = []
    with inj:
        for n_k in sizes:
            k, x = _bench_tokens(decoder.tokenizer, n_k, input_tokens)
            row = _measure(dev, runners, n_k, k, x, repeats, warmup, memory_repeats)
            row["kx_total_bytes"] = dec_params + row["kx_peak_bytes"]
            row["ekx_total_bytes"] = dec_params + enc_params + row["ekx_peak_bytes"]
            row["time_ratio"] = row["ekx_seconds"] / row["kx_seconds"]
            row["memory_ratio"] = row["ekx_peak_bytes"] / max(1, row["kx_peak_bytes"])
            row["total_memory_ratio"] = row["ekx_total_bytes"] / row["kx_total_bytes"]
            rows.append(row)
            echo(format_row(row, header=len(rows) == 1))
    verdict = _verdict(rows)
    res = {
        "model": decoder.fingerprint.to_dict(),
        "device": str(dev),
        "dtype": str(decoder.dtype).replace("torch.", ""),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "encoder_layers": stack.layers,
        "encoder_parameters": stack.num_parameters(),
        "decoder_parameter_bytes": dec_params,
        "encoder_parameter_bytes": enc_params,
        "repeats": repeats,
        "memory_repeats": memory_repeats,
        "rows": rows,
        "verdict": verdict,
    }
    echo(format_verdict(verdict))
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench-inject.json").write_text(json.dumps(res, indent=2))
        plot_bench(res, out / "bench-inject.png")
        echo(f"wrote {out / 'bench-inject.json'} and {out / 'bench-inject.png'}")
    return res


def _runners(decoder, stack, inj) -> dict:
    """The three measured computations, each ``fn(k, x)``: ``kx`` = D(K,x), ``ekx`` = D(E(K,x)+x)
    (encoders, then the decoder over ``x`` with the additions injected), ``enc`` = the encoders
    alone. Logits for the ``x`` positions only, no KV cache."""
    import torch

    from kcache.inject import encoder_additions

    dev = decoder.device
    m = decoder.model

    def run_kx(k, x):
        ids = torch.tensor([k + x], device=dev)
        return m(input_ids=ids, use_cache=False, logits_to_keep=len(x)).logits

    def run_ekx(k, x):
        add = encoder_additions(decoder, stack, [k], [x])
        with inj.static(add):
            ids = torch.tensor([x], device=dev)
            return m(input_ids=ids, use_cache=False, logits_to_keep=len(x)).logits

    def run_enc(k, x):
        return encoder_additions(decoder, stack, [k], [x])

    return {"kx": run_kx, "ekx": run_ekx, "enc": run_enc}


def _timed(dev, fn, *a) -> float:
    """Wall seconds of ``fn(*a)`` in inference mode, synchronised with the device on both sides."""
    import torch

    from kcache.evaluate import synchronize

    synchronize(dev)
    t0 = time.perf_counter()
    with torch.inference_mode():
        fn(*a)
    synchronize(dev)
    return time.perf_counter() - t0


def _peak(dev, fn, *a):
    """Peak memory of ``fn(*a)`` in inference mode (``PeakMemory``). -> (bytes, kind)."""
    import torch

    from kcache.evaluate import PeakMemory

    with PeakMemory(dev) as mem, torch.inference_mode():
        fn(*a)
    return mem.peak, mem.kind


def _measure(dev, runners: dict, n_k: int, k: list[int], x: list[int], repeats: int, warmup: int,
             memory_repeats: int) -> dict:
    """One knowledge size: ``warmup`` untimed rounds, then median times over ``repeats``
    interleaved rounds (kx, ekx, enc) and median peak memory over ``memory_repeats`` single runs
    each, alternating the order. -> the row's measured fields."""
    run_kx, run_ekx, run_enc = runners["kx"], runners["ekx"], runners["enc"]
    for _ in range(warmup):
        _timed(dev, run_kx, k, x)
        _timed(dev, run_ekx, k, x)
    t_kx, t_ekx, t_enc = [], [], []
    for _ in range(repeats):
        t_kx.append(_timed(dev, run_kx, k, x))
        t_ekx.append(_timed(dev, run_ekx, k, x))
        t_enc.append(_timed(dev, run_enc, k, x))
    # memory: median of a few single runs each, alternating the order
    m_kx, m_ekx = [], []
    for r in range(memory_repeats):
        order = [("kx", run_kx), ("ekx", run_ekx)] if r % 2 == 0 else [("ekx", run_ekx), ("kx", run_kx)]
        for name, fn in order:
            p, kind = _peak(dev, fn, k, x)
            (m_kx if name == "kx" else m_ekx).append(p)
    return {
        "knowledge_tokens": n_k,
        "input_tokens": len(x),
        "kx_seconds": statistics.median(t_kx),
        "ekx_seconds": statistics.median(t_ekx),
        "encoder_seconds": statistics.median(t_enc),
        "kx_peak_bytes": int(statistics.median(m_kx)),
        "ekx_peak_bytes": int(statistics.median(m_ekx)),
        "memory_kind": kind,
    }


def _verdict(rows: list[dict]) -> dict:
    """Whether the time and memory targets are met at every size of >= 512 knowledge tokens."""
    big = [r for r in rows if r["knowledge_tokens"] >= 512]
    return {
        "time_target": TIME_TARGET,
        "memory_target": MEMORY_TARGET,
        "time_met": bool(big) and all(r["time_ratio"] <= TIME_TARGET for r in big),
        "memory_met": bool(big) and all(r["memory_ratio"] <= MEMORY_TARGET for r in big),
        "total_memory_met": bool(big) and all(r["total_memory_ratio"] <= MEMORY_TARGET for r in big),
    }


def format_row(r: dict, header: bool = False) -> str:
    mib = 2**20
    line = (f"{r['knowledge_tokens']:>8d} {r['input_tokens']:>5d} {1e3 * r['kx_seconds']:>11.1f} "
            f"{1e3 * r['ekx_seconds']:>13.1f} {1e3 * r['encoder_seconds']:>10.1f} {r['time_ratio']:>7.2f}x "
            f"{r['kx_peak_bytes'] / mib:>10.1f} {r['ekx_peak_bytes'] / mib:>12.1f} {r['memory_ratio']:>7.2f}x "
            f"{r['total_memory_ratio']:>10.2f}x")
    if not header:
        return line
    head = (f"{'|K|':>8} {'|x|':>5} {'D(K,x) ms':>11} {'D(E+x) ms':>13} {'of it E ms':>10} {'time':>8} "
            f"{'D(K,x) MiB':>10} {'D(E+x) MiB':>12} {'peak':>8} {'with wts':>11}")
    return head + "\n" + line


def format_verdict(v: dict) -> str:
    yes = lambda b: "met" if b else "NOT met"  # noqa: E731
    return (f"target at |K| >= 512: time <= {v['time_target']}x {yes(v['time_met'])}; "
            f"peak memory <= {v['memory_target']}x {yes(v['memory_met'])} (activation peak), "
            f"{yes(v['total_memory_met'])} (counting resident weights)")


def plot_bench(res: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = res["rows"]
    ks = [r["knowledge_tokens"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.plot(ks, [1e3 * r["kx_seconds"] for r in rows], "o-", label="D(K,x)")
    a.plot(ks, [1e3 * r["ekx_seconds"] for r in rows], "o-", label="D(E(K,x)+x)")
    a.plot(ks, [1e3 * r["encoder_seconds"] for r in rows], ".--", label="of which encoders")
    a.set_xscale("log", base=2)
    a.set_xlabel("knowledge tokens")
    a.set_ylabel("ms per forward")
    a.set_title(f"time ({res['device']}, |x| = {rows[0]['input_tokens'] if rows else '?'})")
    a.legend()
    for r in rows:
        a.annotate(f"{r['time_ratio']:.2f}x", (r["knowledge_tokens"], 1e3 * r["ekx_seconds"]),
                   textcoords="offset points", xytext=(0, 6), fontsize=8, ha="center")
    b.plot(ks, [r["kx_peak_bytes"] / 2**20 for r in rows], "o-", label="D(K,x)")
    b.plot(ks, [r["ekx_peak_bytes"] / 2**20 for r in rows], "o-", label="D(E(K,x)+x)")
    b.set_xscale("log", base=2)
    b.set_xlabel("knowledge tokens")
    b.set_ylabel(f"peak MiB above idle ({rows[0]['memory_kind'] if rows else ''})")
    b.set_title("peak memory (activations)")
    b.legend()
    for r in rows:
        b.annotate(f"{r['memory_ratio']:.2f}x", (r["knowledge_tokens"], r["ekx_peak_bytes"] / 2**20),
                   textcoords="offset points", xytext=(0, 6), fontsize=8, ha="center")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
