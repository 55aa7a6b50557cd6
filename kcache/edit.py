"""DIEKÆ section 3.4: knowledge editing with the encoders.

The encoders see the input only - no knowledge (``k_ids = []``, shift 0): ``D(E(_, x) + x)``.
They are trained with the target cross-entropy of each edit's rewrite prompt (``source``) ->
new target (``target``) on the ``train`` split, so the edits end up in the encoders' weights;
the decoder stays frozen. Training shares ``kcache.finetune``'s loop (AdamW, ``train.lr_at``
schedule, per-encoder clipping, bf16 autocast on CUDA, seeds, resume) and keeps the last step.

Metrics (ROME / MEMIT definitions), every probability is the probability of the *whole* target
string: ``log P(t | p) = sum of log p(token)`` over all tokens of ``t`` after prompt ``p``
(``align.encode_input(p, t)``'s target mask; the first input position is never scored):

* **ES** (efficacy): fraction of edits with ``P(target | source) > P(target_true | source)``.
* **PS** (paraphrase): the same comparison on each of the edit's ``paraphrases``, pooled over
  all (edit, paraphrase) pairs.
* **NS** (neighbourhood): fraction of (edit, neighbour) pairs where the neighbour prompt still
  prefers its own expected target: ``P(neighbour target | prompt) > P(edit target | prompt)``.

Reported three ways (``edit_report``): **before** (the unedited decoder, on the trained edits
and on the held-out edits), **after, trained edits** (ES on the rewrite prompts that were
trained on; PS and NS on paraphrases / neighbour prompts that never were - the reference
implementation's setting), and **after, held-out edits** (a split never trained on at all: no
knowledge reaches the model there, so ES/PS measure leakage/generalisation rather than
editing, and NS measures collateral damage).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import torch

from kcache._io import now, pyplot, save_png
from kcache.align import encode_input
from kcache.finetune import (
    FinetuneConfig,
    Item,
    scored_logprobs,
    start_stack,
    train_encoders,
)
from kcache.models import Decoder
from kcache.precision import autocast_for
from kcache.train import run_settings


@dataclasses.dataclass
class EditConfig(FinetuneConfig):
    epochs: int = 5
    lr_max: float = 5e-4
    eval_every: int = 10  # steps between training-loss log points (no validation selection: the last step is kept)
    max_edits: int | None = None  # first N edits of the train split (budget)
    max_eval_edits: int | None = None  # first N held-out edits
    eval_split: str = "test"  # held-out edits
    train_split: str = "train"
    score_batch: int = 32


# ---------------------------------------------------------------------------------------------
# scoring


def full_string_logprobs(decoder: Decoder, stack, site: str, layers: list[int], prompts: list[str], targets: list[str],
                         batch: int = 32) -> list[float]:
    """``log P(target | prompt)`` for each pair: the sum of the log-probabilities of every token
    of the target string (not just the first), under ``D(E(_, x) + x)`` (``stack=None``: ``D(x)``).
    The encoders read the input only (no knowledge). Input position 0 is never scored."""
    tok = decoder.tokenizer
    enc = [encode_input(tok, p, t) for p, t in zip(prompts, targets)]
    # scoring keeps the evaluation's precision: bf16 with a bf16 decoder (and on CUDA), else float32
    bf16 = decoder.device.type == "cuda" or decoder.dtype == torch.bfloat16
    autocast = autocast_for(decoder.device, "bfloat16" if bf16 else "float32")
    out = [0.0] * len(enc)
    order = sorted(range(len(enc)), key=lambda i: len(enc[i][0]))
    was = stack.training if stack is not None else False
    if stack is not None:
        stack.eval()
    with torch.no_grad():
        for a in range(0, len(order), batch):
            idx = order[a : a + batch]
            with autocast():
                lp, owner = scored_logprobs(decoder, stack, site, layers, [[] for _ in idx], [enc[i][0] for i in idx],
                                            [enc[i][1] for i in idx])
            sums = torch.zeros(len(idx), dtype=torch.float64)
            if owner:
                sums.index_add_(0, torch.tensor(owner), lp.double().cpu())
            for k, i in enumerate(idx):
                out[i] = float(sums[k])
    if stack is not None and was:
        stack.train()
    return out


def edit_metrics(score, edits: list[dict]) -> dict:
    """ES / PS / NS over ``edits`` (dicts with ``source``, ``target``, ``target_true``,
    ``paraphrases``, ``neighbours``) using ``score(prompts, targets) -> list[log P]``.

    All pairs are scored in one call. Returns fractions (``None`` when there is nothing to
    measure) and counts. Ties count as failures (strictly greater is required).
    """
    prompts, targets, plan = [], [], []

    def add(p, t):
        prompts.append(p)
        targets.append(t)
        return len(prompts) - 1

    for e in edits:
        new, true = e["target"], e["target_true"]
        es = (add(e["source"], new), add(e["source"], true)) if true else None
        ps = [(add(p, new), add(p, true)) for p in (e.get("paraphrases") or [])] if true else []
        ns = [(add(n["prompt"], n["target"]), add(n["prompt"], new)) for n in (e.get("neighbours") or [])]
        plan.append((es, ps, ns))
    s = score(prompts, targets) if prompts else []
    es_hits = [s[a] > s[b] for es, _, _ in plan if es for a, b in [es]]
    ps_hits = [s[a] > s[b] for _, ps, _ in plan for a, b in ps]
    ns_hits = [s[a] > s[b] for _, _, ns in plan for a, b in ns]

    def frac(h):
        return (sum(h) / len(h)) if h else None

    # mean log-probability margins give a graded view next to the 0/1 fractions
    def margin(pairs):
        return (sum(s[a] - s[b] for a, b in pairs) / len(pairs)) if pairs else None

    return {
        "ES": frac(es_hits), "PS": frac(ps_hits), "NS": frac(ns_hits),
        "counts": {"edits": len(edits), "ES": len(es_hits), "PS": len(ps_hits), "NS": len(ns_hits)},
        "mean_margin": {"ES": margin([es for es, _, _ in plan if es]),
                        "PS": margin([p for _, ps, _ in plan for p in ps]),
                        "NS": margin([n for _, _, ns in plan for n in ns])},
    }


def _edit_rows(table, split: str, limit: int | None) -> list[dict]:
    rows = [r for r in table.to_pylist() if r.get("split") == split and r.get("target_true")]
    return rows[:limit] if limit else rows


# ---------------------------------------------------------------------------------------------
# editing


def edit(decoder: Decoder, samples, out, encoders=None, cfg: EditConfig | None = None, progress: bool = True,
         log=None) -> dict:
    """Train encoders (from a bundle, or fresh with ``cfg.from_scratch``) to carry the train-split
    edits with no knowledge input, measure ES/PS/NS before and after, and write the bundle,
    ``edit.json``, ``edit.md``, ``edit.png``, ``history.json``, ``curves.png`` into ``out``.
    Holds the output lock on ``out`` throughout (kcache.lock): one writer per output."""
    from kcache.lock import output_lock

    with output_lock(out, "write edited encoders into it"):
        return _edit(decoder, samples, out, encoders, cfg, progress, log)


def _edit(decoder: Decoder, samples, out, encoders, cfg, progress, log) -> dict:
    from kcache.data.samples import read_samples, sample_set_fingerprint

    cfg = cfg or EditConfig()
    out = Path(out)
    table = samples if not isinstance(samples, (str, Path)) else read_samples(samples)
    stack, base_meta, prov = start_stack(decoder, encoders, cfg)
    layers, site = list(stack.layers), base_meta["site"]
    trained = _edit_rows(table, cfg.train_split, cfg.max_edits)
    held = _edit_rows(table, cfg.eval_split, cfg.max_eval_edits)
    if not trained:
        raise ValueError(f"no edits in split {cfg.train_split!r} (samples need target_true)")
    items = []
    for r in trained:
        x, m = encode_input(decoder.tokenizer, r["source"], r["target"])
        items.append(Item([], x, m, r["id"]))

    def score_with(st):
        return lambda p, t: full_string_logprobs(decoder, st, site, layers, p, t, cfg.score_batch)

    if log:
        log(f"edit: {len(trained)} trained edits, {len(held)} held-out edits ({cfg.eval_split}); "
            "measuring the unedited decoder")
    before = {"trained": edit_metrics(score_with(None), trained),
              "held_out": edit_metrics(score_with(None), held) if held else None}
    # the starting encoders with empty knowledge (not the same as the unedited decoder when starting from a bundle)
    start = {"trained": edit_metrics(score_with(stack), trained)} if not cfg.from_scratch else None
    run_id = {"samples": sample_set_fingerprint(table), "model": base_meta["model"],
              "start": {k: v for k, v in prov.items() if k != "source_training"},
              "config": run_settings(cfg) | {"layers": layers}, "kind": "edit"}

    def save_meta(state):
        return base_meta | {"created": now(), "training": {
            "edited": True, "objective": "cross-entropy of target given source, encoders see no knowledge (DIEKAE 3.4)",
            "start": prov, "step": state["step"], "epoch": state["epoch"], "edits": len(trained),
            "config": run_settings(cfg) | {"layers": layers}}}

    state = train_encoders(decoder, stack, site=site, layers=layers, train=items, val=None, cfg=cfg, out=out,
                           run_id=run_id, save_meta=save_meta, progress=progress, on_step=None, log=log)
    after = {"trained": edit_metrics(score_with(stack), trained),
             "held_out": edit_metrics(score_with(stack), held) if held else None}
    res = {
        "settings": {"model": decoder.fingerprint.to_dict(), "site": site, "layers": layers,
                     "start": {k: v for k, v in prov.items() if k != "source_training"},
                     "train_split": cfg.train_split, "eval_split": cfg.eval_split,
                     "config": run_settings(cfg) | {"layers": layers},
                     "steps": state["step"], "wall_seconds": state["_wall_seconds"]},
        "before": before, "start_encoders": start, "after": after,
        "final_train_nll": next((h["train_nll"] for h in reversed(state["history"])
                                 if h.get("train_nll") is not None), None),
    }
    (out / "edit.json").write_text(json.dumps(res, indent=2, default=str))
    (out / "edit.md").write_text(markdown_edit(res))
    plot_edit(res, out / "edit.png")
    if log:
        log(markdown_edit(res))
    return res


def _pct(v) -> str:
    return "–" if v is None else f"{100 * v:.1f}"


def markdown_edit(res: dict) -> str:
    s = res["settings"]
    rows = [("unedited D(x), trained edits", res["before"]["trained"]),
            ("unedited D(x), held-out edits", res["before"]["held_out"])]
    if res.get("start_encoders"):
        rows.append(("starting encoders E(_,x), trained edits", res["start_encoders"]["trained"]))
    rows += [("edited, trained edits", res["after"]["trained"]), ("edited, held-out edits", res["after"]["held_out"])]
    lines = ["# kcache editing (DIEKÆ 3.4)", "",
             f"Encoders at {s['site']} of layers {s['layers']} started from {s['start'].get('from')}; "
             f"{res['after']['trained']['counts']['edits']} edits of "
             f"split `{s['train_split']}` trained for {s['steps']} steps; "
             f"held-out edits from split `{s['eval_split']}`. "
             "Probabilities are of the whole target string (sum of token log-probs).", "",
             "| model, edits | ES | PS | NS | pairs (ES/PS/NS) |", "|---|---|---|---|---|"]
    for name, m in rows:
        if m is None:
            continue
        c = m["counts"]
        lines.append(f"| {name} | {_pct(m['ES'])} | {_pct(m['PS'])} | {_pct(m['NS'])} | "
                     f"{c['ES']}/{c['PS']}/{c['NS']} |")
    lines += ["", "ES: P(new target | rewrite prompt) > P(target_true | rewrite prompt). PS: "
                  "the same on paraphrased prompts "
              "(never trained on). NS: neighbour prompts keep P(own target) > P(edit's new target). "
              "Held-out edits were never trained on, so their ES/PS show whether anything generalises without the "
              "edit, not editing success."]
    return "\n".join(lines) + "\n"


def plot_edit(res: dict, path: Path) -> None:
    plt = pyplot()
    groups = [("before, trained", res["before"]["trained"]), ("before, held-out", res["before"]["held_out"]),
              ("after, trained", res["after"]["trained"]), ("after, held-out", res["after"]["held_out"])]
    groups = [(n, m) for n, m in groups if m is not None]
    fig, ax = plt.subplots(figsize=(7, 4))
    w = 0.8 / len(groups)
    for k, (name, m) in enumerate(groups):
        vals = [100 * (m[x] or 0) for x in ("ES", "PS", "NS")]
        ax.bar([i + k * w for i in range(3)], vals, w, label=name)
    ax.set_xticks([i + w * (len(groups) - 1) / 2 for i in range(3)], ["ES", "PS", "NS"])
    ax.set_ylim(0, 100)
    ax.set_ylabel("%")
    ax.set_title("editing metrics (whole-string probabilities)")
    ax.legend(fontsize=8)
    save_png(fig, path)


del math
