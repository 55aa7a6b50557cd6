"""Oracle screen: which targets and sink policy carry the knowledge (docs/results.md, first table).

    python pipelines/results/oracle_screen.py demo  [--variants independent-0-mlp,cascade-1-block,...]
    python pipelines/results/oracle_screen.py dream [--variants ...]     # needs ../shared/data/dream/dev.json

For each variant ``TARGETS-SINK-SITE`` it extracts the test split only (layers 3-8, float32
storage) into ``runs/oracle-screen/SET-VARIANT.zarr`` and evaluates the exact cached deltas injected
into D(x) (the oracle: what a perfect stage two would do), next to D(x) and D(K,x). Writes
``runs/oracle-screen/SET.json`` and ``.png`` and prints one line per variant. The test split is
the same as the pipelines' (demo: synth n=1200 seed 0; DREAM: dev.json split by dialogue
600/100/150, seed 0).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

DEFAULT = "independent-0-mlp,independent-1-mlp,cascade-0-mlp,cascade-1-mlp,cascade-1-block,distilled-1-block"


def test_split(which: str):
    from kcache.data.convert import convert
    from kcache.data.samples import read_samples
    from kcache.data.split import split_by_group
    from kcache.data.synth import synth_samples

    if which == "demo":
        table, max_length = synth_samples(1200, 0, 3), 1024
    else:
        out = Path("runs/oracle-screen/dream-converted.parquet")
        out.parent.mkdir(parents=True, exist_ok=True)
        convert("dream", "../shared/data/dream/dev.json", out)
        table = split_by_group(read_samples(out), {"train": 600, "validation": 100, "test": 150}, "dialogue_id", 0)
        max_length = 512
    keep = [i for i, s in enumerate(table["split"].to_pylist()) if s == "test"]
    return table.take(keep), max_length


def plot(data: dict, name: str, path: Path) -> None:
    """Bar chart of the oracle perplexity per variant, with D(x) and D(K,x) as lines (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, base = data["variants"], data["base"]
    names = list(rows)
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.bar(names, [rows[n]["oracle_ppl"] for n in names], color="tab:green")
    for m, c in (("x", "tab:red"), ("kx", "tab:blue")):
        ax.axhline(base[m]["perplexity"], color=c, ls="--", label=f"D({'K,' if m == 'kx' else ''}x) {base[m]['perplexity']:.1f}")
    ax.set_yscale("log")
    ax.set_ylabel("oracle perplexity (test split)")
    ax.set_title(f"{name}: exact cached deltas injected at layers 3-8")
    ax.legend()
    plt.setp(ax.get_xticklabels(), rotation=25, ha="right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("set", choices=["demo", "dream"])
    ap.add_argument("--variants", default=DEFAULT)
    ap.add_argument("--distill-steps", type=int, default=8)
    ap.add_argument("--distill-lr", type=float, default=0.05)
    ap.add_argument("--plot-only", metavar="JSON", help="only draw the PNG of an earlier run's JSON (written next to it)")
    args = ap.parse_args()
    if args.plot_only:
        plot(json.loads(Path(args.plot_only).read_text()), args.set, Path(args.plot_only).with_suffix(".png"))
        return

    from kcache.evaluate import evaluate
    from kcache.extract import ExtractConfig, extract
    from kcache.models import load_decoder

    root = Path("runs/oracle-screen")
    root.mkdir(parents=True, exist_ok=True)
    dec = load_decoder("smollm2-135m", device="cpu")
    table, max_length = test_split(args.set)
    base, rows = None, {}
    for v in args.variants.split(","):
        targets, sink, site = v.split("-")
        cfg = ExtractConfig(layers="3-8", site=site, max_length=max_length, targets=targets, sink=int(sink), dtype="float32",
                            distill_steps=args.distill_steps, distill_lr=args.distill_lr)
        path = root / f"{args.set}-{v}.zarr"
        t0 = time.perf_counter()
        extract(dec, table, path, cfg, progress=False)
        seconds = time.perf_counter() - t0
        res = evaluate(dec, table, None, ["oracle"] if base else ["x", "kx", "oracle"], cache=path, max_length=max_length, controls=False)
        r = res["results"]["all"]
        base = base or {m: {"perplexity": r[m]["perplexity"], "nll": r[m]["nll"]} for m in ("x", "kx")}
        nx, nk, no = base["x"]["nll"], base["kx"]["nll"], r["oracle"]["nll"]
        rows[v] = {"oracle_ppl": r["oracle"]["perplexity"], "gap_closed": (nx - no) / (nx - nk), "extract_seconds": seconds,
                   "samples": r["oracle"]["samples"]}
        print(args.set, v, json.dumps(rows[v]), flush=True)
    (root / f"{args.set}.json").write_text(json.dumps({"base": base, "variants": rows}, indent=1))

    plot({"base": base, "variants": rows}, args.set, root / f"{args.set}.png")
    print(f"wrote {root / (args.set + '.json')} and .png; gap closed = (log ppl_x - log ppl_oracle) / (log ppl_x - log ppl_kx)",
          "" if all(math.isfinite(r["gap_closed"]) for r in rows.values()) else "(some undefined)")


if __name__ == "__main__":
    main()
