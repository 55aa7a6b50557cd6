"""Pipeline stages after ``fit``: ``finetune``, ``evaluate`` (and ``edit``).

``kcache.pipeline.STAGES`` maps each of these sections of a pipeline TOML to its options builder
and its runner here (``run_finetune(ctx, options)`` ...); each returns a JSON-ready summary that
goes into ``report.json``. A stage whose output is complete for the same settings is
skipped.

``[finetune]`` - options of ``kcache.finetune.FinetuneConfig`` (``lr`` is accepted for
``lr_max``), plus ``encoders`` (bundle to start from; default ``RUN/encoders``) and ``out``
(default ``RUN/encoders-ft``). Output: the fine-tuned bundle with ``summary.json``,
``history.json``, ``curves.png``.

``[evaluate]`` - ``split`` (default ``test``), ``limit``, ``oracle`` (bool: also the cached
deltas; default false), ``token_budget``, ``out`` (default ``RUN/eval``). Methods: ``D(x)``,
``D(K,x)``, ``D(E(K,x)+x)`` with the fitted encoders (``ekx_fit``) and with the fine-tuned ones
(``ekx_ft``), each when its bundle exists. Writes ``evaluation.json/.md/.png``; the JSON's
``gap_closed`` holds, per dataset and injected method, the fraction of the log-perplexity gap
between ``D(x)`` and ``D(K,x)`` the method closes: ``(log ppl_x - log ppl_m) / (log ppl_x -
log ppl_kx)`` (1 = as good as knowledge in context, 0 = no better than no knowledge, < 0 worse),
``closes_half`` whether the fine-tuned encoders reach >= 0.5 over all samples, and
``knowledge_use`` per knowledge-reading method (the swap control: a method that closes the gap
without using the knowledge has adapted to the task).
An ``[evaluate.edit]`` sub-table (options of ``kcache.edit.EditConfig``) also runs editing
(``RUN/edit``); ``run_stage("edit", ...)`` runs it from a top-level ``[edit]`` table.

Every table is built by ``kcache.config`` (``finetune_options``, ``evaluate_options``,
``edit_options``): unknown keys and wrong types are refused naming section and key, and
``kcache.pipeline.load_pipeline`` builds them all, naming the file, before any stage runs.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from kcache._io import sha256_file
from kcache.config import config_from, configs_from


def gap_closed(results: dict, methods: list[str]) -> dict:
    """Per dataset: for each method, ``(nll_x - nll_m) / (nll_x - nll_kx)`` (mean NLL = log ppl).
    ``None`` where undefined (missing method, or no gap: ``nll_x <= nll_kx``)."""
    out = {}
    for ds, r in results.items():
        if "x" not in r or "kx" not in r:
            continue
        nx, nk = r["x"]["nll"], r["kx"]["nll"]
        gap = nx - nk
        out[ds] = {"nll_x": nx, "nll_kx": nk, "gap": gap}
        for m in methods:
            if m in r:
                nm = r[m]["nll"]
                ok = gap == gap and nm == nm and gap > 0
                out[ds][m] = (nx - nm) / gap if ok else None
    return out


# ---------------------------------------------------------------------------------------------
# helpers


def _bundle_ready(path: Path) -> bool:
    return (path / "config.json").exists() and (path / "encoders.safetensors").exists()


@dataclasses.dataclass
class StageIO:
    """The keys of ``[finetune]`` / ``[edit]`` that are not training settings."""

    encoders: str | None = None  # bundle to start from (default RUN/encoders)
    out: str | None = None  # output bundle / folder (default RUN/encoders-ft, RUN/edit)


@dataclasses.dataclass
class EvaluateOptions:
    """``[evaluate]`` (see the module docstring)."""

    split: str = "test"  # "" = every split
    limit: int | None = None
    oracle: bool = False
    token_budget: int = 4096
    out: str | None = None  # default RUN/eval
    encoders: str | None = None  # the fitted bundle (default RUN/encoders)
    finetuned: str | None = None  # the fine-tuned bundle (default [finetune].out or RUN/encoders-ft)
    edit: dict | None = None  # [evaluate.edit]: EditConfig options (+ encoders, out)


def finetune_options(cfg: dict, file=None):
    """``[finetune]`` of pipeline config ``cfg`` -> ``(FinetuneConfig, StageIO)``; ConfigError names ``file``."""
    from kcache.finetune import FinetuneConfig

    return configs_from((FinetuneConfig, StageIO), cfg.get("finetune") or {}, "finetune", file)


def edit_options(table: dict | None, where: str = "edit", file=None):
    """An ``[edit]`` / ``[evaluate.edit]`` table -> ``(EditConfig, StageIO)``."""
    from kcache.edit import EditConfig

    return configs_from((EditConfig, StageIO), table or {}, where, file)


def evaluate_options(cfg: dict, file=None):
    """``[evaluate]`` of ``cfg`` -> ``(EvaluateOptions, (EditConfig, StageIO) or None)``."""
    opts = config_from(EvaluateOptions, cfg.get("evaluate") or {}, "evaluate", file)
    return opts, (edit_options(opts.edit, "evaluate.edit", file) if opts.edit is not None else None)


def _source_bundle(io: StageIO, from_scratch: bool, run_dir: Path, section: str, hint: str = "") -> Path | None:
    """The bundle a training stage starts from: ``None`` from scratch, else ``encoders =`` or ``RUN/encoders``,
    which must exist."""
    if from_scratch:
        return None
    source = Path(io.encoders) if io.encoders else run_dir / "encoders"
    if not _bundle_ready(source):
        raise ValueError(f"[{section}]: no encoder bundle at {source} to start from ({hint}set encoders = "
                         "\"...\", or from_scratch = true)")
    return source


def _samples_key(samples) -> str:
    from kcache.data.samples import read_samples, sample_set_fingerprint

    return sample_set_fingerprint(read_samples(samples))


# ---------------------------------------------------------------------------------------------
# stages


def top_edit_options(cfg: dict, file=None):
    """The top-level ``[edit]`` of ``cfg`` -> ``(EditConfig, StageIO)``."""
    return edit_options(cfg.get("edit"), "edit", file)


def run_finetune(ctx, options) -> dict:
    """``[finetune]``: ``options`` from ``finetune_options``; ``ctx`` a ``kcache.pipeline.Context``."""
    from kcache.finetune import finetune

    fcfg, io = options
    run_dir, log = ctx.run_dir, ctx.log
    out = Path(io.out) if io.out is not None else run_dir / "encoders-ft"
    source = _source_bundle(io, fcfg.from_scratch, run_dir, "finetune", "run [fit] first, ")
    summary = finetune(ctx.get_decoder(), ctx.samples, source, out, fcfg, progress=True,
                       log=lambda m: log(m if m.startswith("finetune") else f"finetune: {m}"))
    return {k: v for k, v in summary.items() if k != "run"}


def run_evaluate(ctx, options) -> dict:
    """``[evaluate]``: ``options`` from ``evaluate_options``; ``ctx`` a ``kcache.pipeline.Context``."""
    from kcache.evaluate import METHODS, evaluate, markdown_report, write_report
    from kcache.inject import Injector

    opts, edit_opts = options
    cfg, run_dir, get_decoder, samples, cache, log = (ctx.raw, ctx.run_dir, ctx.get_decoder, ctx.samples,
                                                       ctx.cache, ctx.log)
    split = opts.split or None
    limit = opts.limit
    use_oracle = opts.oracle
    token_budget = opts.token_budget
    out = Path(opts.out) if opts.out is not None else run_dir / "eval"
    fit_dir = Path(opts.encoders) if opts.encoders is not None else run_dir / "encoders"
    ft_dir = Path(opts.finetuned if opts.finetuned is not None
                  else (cfg.get("finetune") or {}).get("out", run_dir / "encoders-ft"))
    have_fit, have_ft = _bundle_ready(fit_dir), _bundle_ready(ft_dir)
    cache_path = Path(cache) if cache is not None else None
    use_oracle = use_oracle and cache_path is not None and cache_path.exists()
    methods = (["x", "kx"] + (["ekx_fit"] if have_fit else []) + (["ekx_ft"] if have_ft else [])
               + (["oracle"] if use_oracle else []))
    key = {"samples": _samples_key(samples), "split": split, "limit": limit, "token_budget": token_budget,
           "methods": methods, "fit": sha256_file(fit_dir / "encoders.safetensors") if have_fit else None,
           "finetuned": sha256_file(ft_dir / "encoders.safetensors") if have_ft else None,
           "cache": str(cache_path) if use_oracle else None, "controls": "other,empty"}
    done = out / "evaluation.json"
    if done.exists():
        old = json.loads(done.read_text())
        if old.get("stage_key") == key:
            log(f"evaluate: {out} up to date (skipped)")
            return _then_edit(ctx, edit_opts, {**_eval_summary(old, out), "skipped": True})
    if not (have_fit or have_ft):
        log("evaluate: no encoder bundle found (fit / finetune not run): evaluating D(x) and D(K,x) only")
    decoder = get_decoder()
    fit_inj = Injector.from_bundle(decoder, fit_dir) if have_fit else None
    ft_inj = Injector.from_bundle(decoder, ft_dir) if have_ft else None
    template = max_length = None
    if fit_inj is not None and ft_inj is not None:
        if fit_inj.sink != ft_inj.sink:
            raise ValueError(f"[evaluate]: the fitted bundle {fit_dir} writes from input position "
                             f"{fit_inj.sink}, the fine-tuned one {ft_dir} from {ft_inj.sink}: "
                             "bundles of one run must share the sink policy")
        if fit_inj.info.template != ft_inj.info.template or fit_inj.info.max_length != ft_inj.info.max_length:
            log("evaluate: warning: the fitted and fine-tuned bundles use different templates / max_length; "
                "items follow the fitted bundle's")
    elif ft_inj is not None:
        template, max_length = ft_inj.template_spec(), ft_inj.info.max_length
    log(f"evaluate: {', '.join(METHODS[m].label for m in methods)} on split {split or 'all'}"
        + (f" (first {limit})" if limit else ""))
    res = evaluate(decoder, samples, fit_inj, methods, cache=cache_path if use_oracle else None, split=split,
                   limit=limit,
                   token_budget=token_budget, template=template, max_length=max_length, extras={"finetuned": ft_inj},
                   progress=True)
    res["settings"]["encoders"] = str(fit_dir) if have_fit else None
    res["settings"]["finetuned_encoders"] = str(ft_dir) if have_ft else None
    gaps = gap_closed(res["results"], [m for m in methods if m.startswith("ekx") or m == "oracle"])
    res["gap_closed"] = gaps
    ft_all = gaps.get("all", {}).get("ekx_ft")
    res["closes_half"] = (ft_all >= 0.5) if ft_all is not None else None
    res["knowledge_use"] = {m: c["knowledge_use"] for m, c in (res.get("controls") or {}).items()
                            if "knowledge_use" in c}
    res["stage_key"] = key
    paths = write_report(res, out)
    md = markdown_report(res) + gap_markdown(res)
    paths["markdown"].write_text(md)
    for line in md.splitlines():
        if line.startswith("|") or line.startswith("Fine-tuned") or line.startswith("**"):
            log(f"evaluate: {line}")
    return _then_edit(ctx, edit_opts, {**_eval_summary(res, out), "skipped": False})


def _then_edit(ctx, edit_opts, summary: dict) -> dict:
    """``[evaluate.edit]`` runs after the evaluation (skipped or not); its summary joins the evaluation's."""
    if edit_opts is not None:
        summary["edit"] = run_edit(ctx, edit_opts)
    return summary


def gap_markdown(res: dict) -> str:
    labels = res["settings"]["labels"]
    gaps = res.get("gap_closed") or {}
    ms = [m for m in res["settings"]["methods"] if m.startswith("ekx") or m == "oracle"]
    if not gaps or not ms:
        return ""
    ds = [d for d in gaps if d != "all"] + ["all"]
    lines = ["", "## Fraction of the log-perplexity gap D(x) -> D(K,x) closed", "",
             "(log ppl_x - log ppl_method) / (log ppl_x - log ppl_kx): 1 = as good as knowledge in context, "
             "0 = no better than no knowledge, < 0 worse.", "",
             "| method | " + " | ".join(ds) + " |", "|---|" + "---|" * len(ds)]
    for m in ms:
        cells = []
        for d in ds:
            v = gaps.get(d, {}).get(m)
            cells.append("–" if v is None else f"{v:.3f}")
        lines.append(f"| {labels[m]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _eval_summary(res: dict, out: Path) -> dict:
    r = res["results"]["all"]
    return {"out": str(out), "split": res["settings"]["split"],
            "perplexity": {m: r[m]["perplexity"] for m in res["settings"]["methods"]},
            "gap_closed": (res.get("gap_closed") or {}).get("all"), "closes_half": res.get("closes_half"),
            "knowledge_use": res.get("knowledge_use")}


def run_edit(ctx, options) -> dict:
    """``[edit]`` / ``[evaluate.edit]``: ``options`` from ``edit_options``; ``ctx`` a ``kcache.pipeline.Context``."""
    from kcache.edit import edit

    ecfg, io = options
    run_dir, samples, log = ctx.run_dir, ctx.samples, ctx.log
    out = Path(io.out) if io.out is not None else run_dir / "edit"
    source = _source_bundle(io, ecfg.from_scratch, run_dir, "edit")
    src_key = sha256_file(source / "encoders.safetensors") if source is not None else None
    key = {"samples": _samples_key(samples), "config": json.loads(json.dumps(dataclasses.asdict(ecfg))),
           "source": src_key}
    done = out / "edit.json"
    if done.exists():
        old = json.loads(done.read_text())
        if old.get("stage_key") == key:
            log(f"edit: {out} up to date (skipped)")
            return {"out": str(out), "before": old["before"], "after": old["after"], "skipped": True}
    res = edit(ctx.get_decoder(), samples, out, source, ecfg, progress=True,
               log=lambda m: log(f"edit: {m}"))
    res["stage_key"] = key
    done.write_text(json.dumps(res, indent=2, default=str))
    return {"out": str(out), "before": res["before"], "after": res["after"], "skipped": False}


def run_stage(stage: str, cfg: dict, run_dir, get_decoder, samples, cache, log=print) -> dict:
    """Run one post-fit stage (``finetune``, ``evaluate`` or ``edit``) of pipeline config ``cfg``
    outside ``kcache run`` -> its summary (what ``kcache.pipeline.STAGES`` does for each stage)."""
    from kcache.pipeline import STAGES, Context, RunOptions

    if stage not in ("finetune", "evaluate", "edit"):
        raise ValueError(f"unknown stage {stage!r}; kcache.stages runs finetune, evaluate, edit")
    ctx = Context(raw=cfg, run=RunOptions(dir=str(run_dir)), run_dir=Path(run_dir), get_decoder=get_decoder,
                  log=log, samples=samples, cache=None if cache is None else Path(cache))
    return STAGES[stage].run(ctx, STAGES[stage].options(cfg))
