"""Collect the result runs (``kcache run pipelines/results/*.toml``) into one table, JSON and PNG.

    python pipelines/results/summarize.py [runs/results] [--out docs/results]

Reads each run's ``report.json`` (stage times, fit FVU per layer) and ``eval/evaluation.json``
(perplexities, knowledge-swap controls) and writes ``OUT.json``, ``OUT.png`` and a Markdown table
on stdout (pasted into docs/results.md).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _row(run: Path) -> dict | None:
    rep, ev = run / "report.json", run / "eval" / "evaluation.json"
    if not rep.exists() or not ev.exists():
        return None
    report, res = json.loads(rep.read_text()), json.loads(ev.read_text())
    r = res["results"]["all"]
    ctl = res.get("controls") or {}
    if "ekx" in r and "ekx_fit" not in r:  # evaluated with `kcache evaluate --encoders RUN/encoders` (fit only)
        r["ekx_fit"] = r.pop("ekx")
        if "ekx" in ctl:
            ctl["ekx_fit"] = ctl.pop("ekx")

    def ppl(m):
        return (r.get(m) or {}).get("perplexity")

    def use(m):
        k = (ctl.get(m) or {}).get("knowledge_use") or {}
        return {"nats": k.get("nats"), "ci": k.get("ci")}

    def gap(m):
        g = (ctl.get(m) or {}).get("gap_closed") or {}
        return {"fraction": g.get("fraction"), "ci": g.get("ci")}

    fit = report.get("stages", {}).get("fit", {})
    return {
        "run": run.name,
        "targets": res["settings"].get("targets"),
        "sink": res["settings"].get("sink"),
        "samples": r["x"]["samples"],
        "tokens": r["x"]["tokens"],
        "ppl": {m: ppl(m) for m in ("x", "kx", "oracle", "ekx_fit", "ekx_ft")},
        "knowledge_use": {m: use(m) for m in ("kx", "ekx_fit", "ekx_ft")},
        "gap_closed": {m: gap(m) for m in ("oracle", "ekx_fit", "ekx_ft")},
        "fvu": {l: v.get("val_fvu") for l, v in (fit.get("layers") or {}).items()},
        "seconds": report.get("seconds"),
    }


def _f(v, fmt=".2f"):
    return "–" if v is None else f"{v:{fmt}}"


def _ci(d, key, fmt="+.3f"):
    if not d or d.get(key) is None:
        return "–"
    lo, hi = d.get("ci") or (None, None)
    return f"{d[key]:{fmt}} [{lo:{fmt}}, {hi:{fmt}}]" if lo is not None else f"{d[key]:{fmt}}"


def markdown(rows: list[dict]) -> str:
    lines = ["| run | D(x) | D(K,x) | oracle | after fit | after finetune | use: D(K,x) | use: fit | use: finetune | gap closed: fit | gap closed: finetune | FVU per layer | extract / fit / finetune s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        p, u, g, s = r["ppl"], r["knowledge_use"], r["gap_closed"], r["seconds"] or {}
        vals = [v for _, v in sorted(r["fvu"].items(), key=lambda kv: int(kv[0]))]
        if len(vals) <= 8:
            fvu = " ".join(_f(v) for v in vals)
        else:  # Table 5 rows: too many layers for one cell
            fvu = f"{len(vals)} layers: mean {sum(vals) / len(vals):.2f} ({min(vals):.2f}-{max(vals):.2f})"
        lines.append(f"| {r['run']} | {_f(p['x'])} | {_f(p['kx'])} | {_f(p['oracle'])} | {_f(p['ekx_fit'])} | {_f(p['ekx_ft'])} | "
                     f"{_ci(u['kx'], 'nats')} | {_ci(u['ekx_fit'], 'nats')} | {_ci(u['ekx_ft'], 'nats')} | "
                     f"{_ci(g['ekx_fit'], 'fraction', '.3f')} | {_ci(g['ekx_ft'], 'fraction', '.3f')} | {fvu} | "
                     f"{_f(s.get('extract'), '.0f')} / {_f(s.get('fit'), '.0f')} / {_f(s.get('finetune'), '.0f')} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    names = [r["run"] for r in rows]
    methods = [("x", "D(x)"), ("kx", "D(K,x)"), ("oracle", "oracle"), ("ekx_fit", "after fit"), ("ekx_ft", "after finetune")]
    w = 0.8 / len(methods)
    for k, (m, label) in enumerate(methods):
        axes[0].bar([i + k * w for i in range(len(rows))], [r["ppl"][m] or 0 for r in rows], w, label=label)
    axes[0].set_yscale("log")
    axes[0].set_xticks([i + 0.4 - w / 2 for i in range(len(rows))], names, rotation=25, ha="right")
    axes[0].set_title("perplexity of the target (test split)")
    axes[0].legend(fontsize=8)
    users = [("kx", "D(K,x)"), ("ekx_fit", "after fit"), ("ekx_ft", "after finetune")]
    w = 0.8 / len(users)
    for k, (m, label) in enumerate(users):
        vals = [r["knowledge_use"][m]["nats"] or 0 for r in rows]
        cis = [r["knowledge_use"][m]["ci"] or [0, 0] for r in rows]
        err = [[max(0, v - c[0]) for v, c in zip(vals, cis)], [max(0, c[1] - v) for v, c in zip(vals, cis)]]
        axes[1].bar([i + k * w for i in range(len(rows))], vals, w, yerr=err, capsize=3, label=label)
    axes[1].axhline(0, color="black", lw=0.8)
    axes[1].set_yscale("symlog", linthresh=0.01)  # D(K,x)'s nats and the encoders' hundredths on one axis
    axes[1].set_xticks([i + 0.4 - w / 2 for i in range(len(rows))], names, rotation=25, ha="right")
    axes[1].set_title("knowledge use: NLL(other K) - NLL(right K), nats/token, 95% CI")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str]) -> None:
    root = Path(argv[0]) if argv and not argv[0].startswith("--") else Path("runs/results")
    out = Path(argv[argv.index("--out") + 1]) if "--out" in argv else Path("docs/results")
    rows = [r for r in (_row(d) for d in sorted(root.iterdir()) if d.is_dir()) if r]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    plot(rows, out.with_suffix(".png"))
    print(markdown(rows))


if __name__ == "__main__":
    main(sys.argv[1:])
