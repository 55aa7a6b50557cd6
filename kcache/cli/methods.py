"""The methods beside DIEKÆ: ``train-baseline``, ``eval-choice``, ``evaluate-baselines`` and
``knowla train|eval``. Thin layers over :mod:`kcache.methods` (see docs/methods.md).

``evaluate-baselines`` evaluates D(x), D(K,x), D(E(K,x)+x) (with ``--encoders``) and one
``base_<dirname>`` method per ``--baselines`` directory (D(K,x) through that baseline, see
:mod:`kcache.methods.scoring`) on the same batches and writes the usual
``evaluation.json / .md / .png``.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from kcache.cli._options import DEVICE_HELP, MODEL_HELP, DeviceOpt, DtypeOpt, ModelOpt
from kcache.cli.errors import errors

KNOWLA_HELP = "KnowLA: a knowledgeable adaptation layer over KG entity links, trained with LoRA."

_SPLIT = typer.Option(None, "--split", help="use only samples of this split")
_LIMIT = typer.Option(None, "--limit", help="use only the first N samples (after --split)")


def _samples(path: Path, split: str | None, limit: int | None) -> list[dict]:
    from kcache.data.samples import read_samples

    recs = read_samples(path).to_pylist()
    if split is not None:
        recs = [r for r in recs if r.get("split") == split]
    if limit is not None:
        recs = recs[:limit]
    if not recs:
        raise ValueError(f"{path}: no samples" + (f" of split {split!r}" if split else ""))
    return recs


def _layers(spec: str | None, num_layers: int) -> list[int] | None:
    if spec is None:
        return None
    from kcache.align import parse_layers

    return parse_layers(spec, num_layers)


def _write_report(path: Path | None, doc: dict) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")


def train_baseline_cmd(
    method: str = typer.Option(..., "--method", help="lora | kasa | sft"),
    samples: Path = typer.Option(..., "--samples", "-s", help="samples .parquet or .jsonl (D(K,x) -> target)"),
    out: Path = typer.Option(..., "--out", "-o", help="output directory (adapter / weights + kcache-method.json)"),
    model: str = ModelOpt,
    steps: int | None = typer.Option(None, "--steps", help="optimizer steps (default: --epochs over the samples)"),
    epochs: float = typer.Option(1.0, "--epochs"),
    lr: float | None = typer.Option(None, "--lr", help="peak learning rate (default 1e-4 LoRA/KaSA, 1e-6 SFT)"),
    batch_size: int = typer.Option(8, "--batch-size"),
    seed: int = typer.Option(0, "--seed"),
    rank: int = typer.Option(24, "--rank", help="LoRA/KaSA rank (DIEKÆ A.4: 24)"),
    alpha: float = typer.Option(32, "--alpha", help="LoRA/KaSA alpha (DIEKÆ A.4: 32)"),
    dropout: float = typer.Option(0.05, "--dropout"),
    targets: str = typer.Option("q_proj,k_proj,v_proj,o_proj", "--targets", help="comma-separated module names"),
    layers: str | None = typer.Option(None, "--layers", help="adapt only these blocks (3-8, 3,5,7); default all"),
    kasa_beta: float = typer.Option(1e-4, "--kasa-beta", help="KaSA singular-value L2 weight"),
    kasa_gamma: float = typer.Option(1e-3, "--kasa-gamma", help="KaSA orthogonality weight"),
    max_length: int = typer.Option(1024, "--max-length"),
    split: str | None = _SPLIT,
    limit: int | None = _LIMIT,
    log_every: int = typer.Option(10, "--log-every"),
    device: str | None = DeviceOpt,
    model_dtype: str | None = DtypeOpt,
):
    """Train a LoRA / KaSA / SFT baseline to use the knowledge given in context."""
    from kcache.methods.baselines import train_baseline
    from kcache.models import load_decoder

    with errors():
        recs = _samples(samples, split, limit)
        decoder = load_decoder(model, device=device, dtype=model_dtype)
        res = train_baseline(decoder, recs, method, out, steps=steps, epochs=epochs, lr=lr, batch_size=batch_size,
                             seed=seed, rank=rank, alpha=alpha, dropout=dropout,
                             targets=[t.strip() for t in targets.split(",") if t.strip()],
                             layers=_layers(layers, decoder.layers.num_layers), kasa_beta=kasa_beta,
                             kasa_gamma=kasa_gamma, max_length=max_length, log_every=log_every, log=typer.echo)
    typer.echo(f"wrote {out}: {method}, {res.trainable_params:,} trainable parameters, "
               f"final loss {res.config['final_loss']:.4f}")


def eval_choice_cmd(
    samples: Path = typer.Option(..., "--samples", "-s", help="multiple-choice samples (options + label)"),
    baseline: Path | None = typer.Option(None, "--baseline",
                                         help="a train-baseline output directory (default: the plain model)"),
    model: str = ModelOpt,
    split: str | None = _SPLIT,
    limit: int | None = _LIMIT,
    batch_size: int = typer.Option(16, "--batch-size"),
    report: Path | None = typer.Option(None, "--report", help="write accuracy, predictions and scores as JSON"),
    device: str | None = DeviceOpt,
    model_dtype: str | None = DtypeOpt,
):
    """Multiple-choice accuracy (lowest mean answer-token loss) of the plain model or a baseline."""
    from kcache.methods.baselines import load_baseline, multiple_choice_accuracy
    from kcache.models import load_decoder

    with errors():
        recs = _samples(samples, split, limit)
        decoder = load_decoder(model, device=device, dtype=model_dtype)
        m = load_baseline(baseline, decoder) if baseline is not None else decoder.model
        acc, det = multiple_choice_accuracy(m, decoder.tokenizer, recs, batch_size=batch_size, return_details=True)
    typer.echo(f"accuracy {acc:.4f} ({sum(p == l for p, l in zip(det['predictions'], det['labels']))}/{len(recs)})")
    _write_report(report, {"accuracy": acc, "samples": len(recs),
                           "baseline": str(baseline) if baseline else None, **det})


def evaluate_baselines_cmd(
    samples: Path = typer.Option(..., "--samples", "-s", help="samples .parquet or .jsonl"),
    baselines: list[Path] = typer.Option(..., "--baselines", "-b",
                                         help="train-baseline output directory; repeat for several"),
    encoders: Path = typer.Option(None, "--encoders", "-e", help="encoder bundle directory (adds D(E(K,x)+x))"),
    split: str = typer.Option("test", "--split", help="evaluate this split only ('' for all rows)"),
    out: Path = typer.Option(Path("eval-baselines"), "--out", "-o", help="directory for evaluation.json / .md / .png"),
    limit: int = typer.Option(None, "--limit", help="first N samples of the split"),
    model: str = typer.Option("smollm2-135m", "--model", "-m", help=MODEL_HELP),
    token_budget: int = typer.Option(4096, "--token-budget", help="padded tokens per batch"),
    max_length: int = typer.Option(None, "--max-length",
                                   help="bound on len(k_ids + x_ids) (default: the bundle's, else 1024)"),
    threads: int = typer.Option(None, "--threads", help="torch CPU threads (default: torch's)"),
    device: str = typer.Option(None, "--device", help=DEVICE_HELP),
    model_dtype: str = typer.Option(None, "--model-dtype", help="float32 | bfloat16 | float16"),
):
    """D(x), D(K,x), D(E(K,x)+x) and D(K,x) through each LoRA / KaSA / SFT baseline."""
    import torch

    from kcache.evaluate import evaluate, markdown_report, write_report
    from kcache.methods.scoring import (
        register_baseline_methods,
        release,
        trainable_parameters,
    )
    from kcache.models import load_decoder

    if threads:
        torch.set_num_threads(threads)
    with errors():
        names = register_baseline_methods(baselines)
        methods = ["x", "kx"] + (["ekx"] if encoders is not None else []) + names
        decoder = load_decoder(model, device=device, dtype=model_dtype)
        try:
            res = evaluate(decoder, samples, encoders, methods, split=split or None, limit=limit,
                           token_budget=token_budget, max_length=max_length, progress=True)
        finally:
            release()
        res["settings"]["baselines"] = {n: str(p) for n, p in zip(names, baselines)}
        res["settings"]["trainable_params"] = trainable_parameters(baselines)
        paths = write_report(res, out)
    typer.echo(markdown_report(res))
    typer.echo("wrote " + ", ".join(str(p) for p in paths.values()))


def knowla_train_cmd(
    samples: Path = typer.Option(..., "--samples", "-s"),
    links: Path = typer.Option(..., "--links", help="links of the samples' source (kcache kg link)"),
    embeddings: Path = typer.Option(..., "--embeddings", help="entity embeddings of the same KG"),
    out: Path = typer.Option(..., "--out", "-o"),
    model: str = ModelOpt,
    layers: str | None = typer.Option(None, "--layers",
                                      help="blocks after which to insert the layer (default: the middle one)"),
    random_vectors: int | None = typer.Option(None, "--random-vectors",
                                              help="ablation: replace the vectors by Gaussian ones with this seed "
                                                   "(written to OUT/random-embeddings.parquet)"),
    no_lora: bool = typer.Option(False, "--no-lora", help="train the adaptation layer alone"),
    lora_r: int = typer.Option(16, "--lora-r"),
    lora_alpha: float = typer.Option(16, "--lora-alpha"),
    intermediate_size: int = typer.Option(1024, "--intermediate-size", help="SwiGLU width of the knowledge mapping"),
    value: str = typer.Option("mapped", "--value", help="mapped | raw: sum the mapped or the raw entity vectors"),
    steps: int | None = typer.Option(None, "--steps"),
    epochs: float = typer.Option(1.0, "--epochs"),
    lr: float = typer.Option(3e-4, "--lr"),
    batch_size: int = typer.Option(8, "--batch-size"),
    seed: int = typer.Option(0, "--seed"),
    split: str | None = _SPLIT,
    limit: int | None = _LIMIT,
    log_every: int = typer.Option(10, "--log-every"),
    device: str | None = DeviceOpt,
    model_dtype: str | None = DtypeOpt,
):
    """Train KnowLA (+ LoRA) on samples with entity links."""
    from kcache.kg.tables import read_embeddings, write_embeddings
    from kcache.methods.knowla import random_embeddings, train_knowla
    from kcache.models import load_decoder

    with errors():
        recs = _samples(samples, split, limit)
        emb = read_embeddings(embeddings)
        if random_vectors is not None:
            emb = random_embeddings(emb, seed=random_vectors)
            out.mkdir(parents=True, exist_ok=True)
            write_embeddings(emb, out / "random-embeddings.parquet")
        decoder = load_decoder(model, device=device, dtype=model_dtype)
        res = train_knowla(decoder, recs, links, emb, out, layers=_layers(layers, decoder.layers.num_layers),
                           lora=not no_lora, lora_r=lora_r,
                           lora_alpha=lora_alpha, intermediate_size=intermediate_size, value=value, steps=steps,
                           epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, log_every=log_every, log=typer.echo)
    typer.echo(f"wrote {out}: KnowLA {res.config['knowla_params']:,} + LoRA {res.config['lora_params']:,} trainable "
               f"parameters, final loss {res.config['final_loss']:.4f}")


def knowla_eval_cmd(
    run: Path = typer.Argument(..., help="a knowla train output directory"),
    samples: Path = typer.Option(..., "--samples", "-s"),
    links: Path = typer.Option(..., "--links"),
    embeddings: Path | None = typer.Option(None, "--embeddings",
                                           help="default: RUN/random-embeddings.parquet when the run made one"),
    model: str = ModelOpt,
    split: str | None = _SPLIT,
    limit: int | None = _LIMIT,
    batch_size: int = typer.Option(16, "--batch-size"),
    report: Path | None = typer.Option(None, "--report"),
    device: str | None = DeviceOpt,
    model_dtype: str | None = DtypeOpt,
):
    """Multiple-choice accuracy of a trained KnowLA run."""
    from kcache.methods.knowla import load_knowla, multiple_choice_accuracy
    from kcache.models import load_decoder

    with errors():
        if embeddings is None:
            if not (run / "random-embeddings.parquet").exists():
                raise ValueError("--embeddings is required (the run did not use random vectors)")
            embeddings = run / "random-embeddings.parquet"
        recs = _samples(samples, split, limit)
        decoder = load_decoder(model, device=device, dtype=model_dtype)
        m, kl = load_knowla(run, decoder, embeddings)
        acc, det = multiple_choice_accuracy(m, kl, decoder.tokenizer, recs, links, batch_size=batch_size,
                                            return_details=True)
    typer.echo(f"accuracy {acc:.4f} ({sum(p == l for p, l in zip(det['predictions'], det['labels']))}/{len(recs)})")
    _write_report(report, {"accuracy": acc, "samples": len(recs), "run": str(run), **det})
