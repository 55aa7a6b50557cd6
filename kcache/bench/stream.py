"""``kcache bench fit``, the sources: one cache read locally, locally with on-the-fly verification, over
loopback HTTP (streamed, verified, read ahead: kcache.cache.stream) and after ``kcache pull`` into a
local directory. For each: the loader alone (MB/s) and a short fit (the share of step time spent
waiting for data). The HTTP server is kcache.bench.loopback, a thread of this process (it shares
the CPU with the trainer, as a file server on the same machine would).
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
from pathlib import Path

SOURCES = ("local", "local-verify", "http", "pulled")
WAIT_TARGET = 0.10  # of the training wall time, over loopback HTTP


def loader_pass(spec: str, verify: bool | None, batch_size: int, buffer_mb: int) -> dict:
    """One epoch of the training loader over the train split, from a freshly opened cache (a cold
    buffer): tokens/s, MB/s of stored deltas (uncompressed, as ``bench fit``'s loader figure), the
    time to the first batch, and for a verified read the bytes fetched (compressed files, whole) and
    the time spent hashing."""
    import numpy as np

    from kcache.cache.stream import open_streaming
    from kcache.fit import BatchLoader, CacheReader

    c = open_streaming(spec, verify, buffer_mb)
    reader = CacheReader(c, c.layers)
    train = np.nonzero(np.array(c.index["split"].to_pylist()) == "train")[0]
    before = dict(c.verified.stats) if c.verified is not None else None
    t0 = time.perf_counter()
    loader = BatchLoader(reader, train, batch_size, 2048, 0, 0)
    tokens, first = 0, None
    try:
        for b in loader:
            first = time.perf_counter() - t0 if first is None else first
            tokens += int(b.valid.sum())
    finally:
        loader.close()  # its read-ahead threads, whatever happened
    seconds = time.perf_counter() - t0
    # The first batch waits for the shuffling buffer (2,048 samples) to fill: for a small cache, the whole epoch.
    out = {"seconds": seconds, "first_batch_seconds": first, "tokens_per_second": tokens / seconds,
           "mb_per_second": reader.bytes_read / 2**20 / seconds, "verified": c.verified is not None}
    if before is not None:
        fetched = c.verified.stats["bytes_fetched"] - before["bytes_fetched"]
        out |= {"fetched_mb": fetched / 2**20, "fetched_mb_per_second": fetched / 2**20 / seconds,
                "hash_seconds": c.verified.stats["hash_seconds"] - before["hash_seconds"]}
    return out


@contextlib.contextmanager
def _sources(cache: Path, names: tuple[str, ...], log):
    """name -> (spec, verify) for each source; serves ``cache`` over loopback HTTP and pulls it when asked."""
    from kcache.bench.loopback import serve
    from kcache.cache.remote import pull

    tmp = Path(tempfile.mkdtemp(prefix="kcache-benchstream-"))
    try:
        with serve(cache.parent) as (url, _):
            specs = {"local": (str(cache), False), "local-verify": (str(cache), True),
                     "http": (f"{url}/{cache.name}", None)}
            extra = {}
            if "pulled" in names:
                t0 = time.perf_counter()
                report = pull(specs["http"][0], tmp / "pulled.zarr", progress=False)
                extra["pull_seconds"] = time.perf_counter() - t0
                extra["pull_mb_per_second"] = report["bytes_downloaded"] / 2**20 / extra["pull_seconds"]
                log(f"  kcache pull over loopback HTTP: {report['bytes_downloaded'] / 2**20:.1f} MB in "
                    f"{extra['pull_seconds']:.1f} s (download, digests, then a full `kcache validate`)")
                specs["pulled"] = (str(tmp / "pulled.zarr"), False)
            yield {n: specs[n] for n in names}, extra
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def bench_sources(cache: Path, names: tuple[str, ...], fit_run, batch_size: int, buffer_mb: int, log,
                  local_fit: dict | None = None) -> dict:
    """Loader figures and a short fit (``fit_run(spec, verify=…, stream_buffer_mb=…)``) per source; the
    ``local`` fit may be given (the bench's own compute run: same settings)."""
    unknown = set(names) - set(SOURCES)
    if unknown:
        raise ValueError(f"unknown source(s) {sorted(unknown)}: expected some of {', '.join(SOURCES)}")
    rows: dict[str, dict] = {}
    with _sources(Path(cache), names, log) as (specs, extra):
        for name, (spec, verify) in specs.items():
            row = {"spec": spec, "loader": loader_pass(spec, verify, batch_size, buffer_mb)}
            if name == "local" and local_fit is not None:
                row["fit"] = local_fit
            else:
                row["fit"] = fit_run(spec, verify=verify, stream_buffer_mb=buffer_mb)
            rows[name] = row
            _log_row(name, row, log)
    res = {"sources": rows, "stream_buffer_mb": buffer_mb, **extra, "target_data_wait_fraction_http": WAIT_TARGET}
    if "http" in rows:
        res["target_met_http"] = rows["http"]["fit"]["data_wait_fraction"] <= WAIT_TARGET
        log(f"  waiting for data over loopback HTTP: {rows['http']['fit']['data_wait_fraction']:.1%} of training "
            f"time (target <= {WAIT_TARGET:.0%}: {'met' if res['target_met_http'] else 'NOT met'})")
    return res


def _log_row(name: str, row: dict, log) -> None:
    ld, fit = row["loader"], row["fit"]
    fetched = (f", {ld['fetched_mb_per_second']:6.1f} MB/s fetched+verified ({ld['hash_seconds']:.1f} s hashing)"
               if ld.get("verified") else "")
    log(f"  {name:>12}: loader {ld['mb_per_second']:6.1f} MB/s of deltas{fetched}, first batch after "
        f"{ld['first_batch_seconds']:.1f} s; fit "
        f"{fit['steps_per_second']:.2f} steps/s, data wait {fit['data_wait_fraction']:.1%}")


def plot_sources(path: Path, res: dict) -> None:
    """Loader MB/s per source, the fit's data-wait share in each label (a PNG at ``path``)."""
    from kcache._io import pyplot, save_png

    rows = res["sources"]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    labels = [f"{n} (wait {r['fit']['data_wait_fraction']:.1%})" for n, r in rows.items()]
    fig, ax = pyplot().subplots(figsize=(7, 3.2))
    bars = ax.barh(labels, [r["loader"]["mb_per_second"] for r in rows.values()],
                   color=["#888", "#4a7", "#47a", "#a74"][: len(rows)])
    ax.bar_label(bars, fmt="%.1f")
    ax.set(title="stage two: loader throughput by source (training data wait)", xlabel="MB/s of stored deltas")
    ax.invert_yaxis()
    save_png(fig, path)
