"""``kcache finetune`` and ``kcache edit`` (thin layers over ``kcache.finetune`` / ``kcache.edit``).

``register(app)`` adds both commands to the main typer app; ``kcache/cli.py`` calls it once.
"""

from __future__ import annotations

from pathlib import Path

import typer

from kcache.cli_errors import ensure_writable_dir, errors as _errors  # the one CLI error handler

_MODEL_HELP = "hub id, local HF directory, .gguf file, or smollm2-135m"
_DEVICE_HELP = "cpu | cuda | cuda:N (default: cuda when available)"


def _common(epochs, batch_size, grad_accum, lr, lr_min, eval_every, patience, max_steps, seed, from_scratch, layers, site,
            max_length, max_train_samples, val_max_samples) -> dict:
    d = dict(epochs=epochs, batch_size=batch_size, grad_accum=grad_accum, lr_max=lr, lr_min=lr_min, eval_every=eval_every, patience=patience,
             max_steps=max_steps, seed=seed, from_scratch=from_scratch, layers=layers, site=site, max_length=max_length)
    if max_train_samples is not None:
        d["max_train_samples"] = max_train_samples
    if val_max_samples is not None:
        d["val_max_samples"] = val_max_samples
    return d


def finetune_cmd(
    samples: Path = typer.Option(..., "--samples", "-s", help="samples .parquet or .jsonl (train split trains, validation split selects)"),
    encoders: Path = typer.Option(None, "--encoders", "-e", help="fitted encoder bundle to start from"),
    out: Path = typer.Option(..., "--out", "-o", help="output bundle directory (resumes if a checkpoint is there)"),
    from_scratch: bool = typer.Option(False, "--from-scratch", help="freshly initialised encoders (paper 6.2 ablation); site/layers from flags"),
    layers: str = typer.Option(None, "--layers", help="layers (from scratch: default 3-8; with --encoders: a subset of the bundle's)"),
    site: str = typer.Option("block", "--site", help="from scratch: block | mlp"),
    model: str = typer.Option("smollm2-135m", "--model", "-m", help=_MODEL_HELP),
    epochs: int = typer.Option(1, "--epochs"),
    batch_size: int = typer.Option(8, "--batch-size"),
    grad_accum: int = typer.Option(1, "--grad-accum"),
    lr: float = typer.Option(1e-4, "--lr", help="peak learning rate (warm-up from --lr-min, cosine back to it)"),
    lr_min: float = typer.Option(1e-5, "--lr-min"),
    eval_every: int = typer.Option(50, "--eval-every", help="optimizer steps between validations"),
    patience: int = typer.Option(5, "--patience"),
    max_steps: int = typer.Option(None, "--max-steps"),
    max_train_samples: int = typer.Option(None, "--max-train-samples"),
    val_max_samples: int = typer.Option(None, "--val-max-samples", help="validation samples used for selection (default 256)"),
    max_length: int = typer.Option(None, "--max-length", help="bound on len(k_ids + x_ids) (default: the bundle's, 1024 from scratch)"),
    seed: int = typer.Option(0, "--seed"),
    device: str = typer.Option(None, "--device", help=_DEVICE_HELP),
    model_dtype: str = typer.Option(None, "--model-dtype", help="float32 | bfloat16 | float16"),
    objective: str = typer.Option("ce", "--objective", help="ce (target cross-entropy, the paper's) | kl (KL to D(K,x) at every input position) | ce+kl"),
):
    """DIEKÆ 3.3: fine-tune encoders through the frozen decoder (target cross-entropy, or KL to D(K,x))."""
    from kcache.finetune import FinetuneConfig, finetune
    from kcache.models import load_decoder

    with _errors():
        ensure_writable_dir(out, "output bundle directory")  # before loading the model or training
        cfg = FinetuneConfig(**_common(epochs, batch_size, grad_accum, lr, lr_min, eval_every, patience, max_steps, seed, from_scratch,
                                       layers, site, max_length, max_train_samples, val_max_samples), objective=objective)
        if not from_scratch and encoders is None:
            raise ValueError("give --encoders DIR (a fitted bundle) or --from-scratch")
        decoder = load_decoder(model, device=device, dtype=model_dtype)
        s = finetune(decoder, samples, encoders, out, cfg, progress=True, log=typer.echo)
    if s.get("skipped"):
        typer.echo(f"{out}: already complete for these settings")
    typer.echo(f"validation perplexity (target tokens): {s['val_ppl_start']:.3f} at step 0 -> {s['val_ppl_best']:.3f} at step {s['best_step']} of {s['steps']}")
    typer.echo(f"bundle: {out}/ (config.json, encoders.safetensors); history: {out}/history.json; curve: {out}/curves.png")


def edit_cmd(
    samples: Path = typer.Option(..., "--samples", "-s", help="samples with target_true (+ paraphrases, neighbours), e.g. the demo set or CounterFact"),
    out: Path = typer.Option(..., "--out", "-o", help="output directory: edited bundle, edit.json / .md / .png"),
    encoders: Path = typer.Option(None, "--encoders", "-e", help="encoder bundle to start from"),
    from_scratch: bool = typer.Option(False, "--from-scratch", help="freshly initialised encoders; site/layers from flags"),
    layers: str = typer.Option(None, "--layers", help="layers (from scratch: default 3-8)"),
    site: str = typer.Option("block", "--site"),
    model: str = typer.Option("smollm2-135m", "--model", "-m", help=_MODEL_HELP),
    epochs: int = typer.Option(5, "--epochs"),
    batch_size: int = typer.Option(8, "--batch-size"),
    lr: float = typer.Option(5e-4, "--lr"),
    lr_min: float = typer.Option(1e-5, "--lr-min"),
    max_steps: int = typer.Option(None, "--max-steps"),
    max_edits: int = typer.Option(None, "--max-edits", help="first N edits of the train split"),
    eval_split: str = typer.Option("test", "--eval-split", help="held-out edits (never trained on)"),
    max_eval_edits: int = typer.Option(None, "--max-eval-edits"),
    seed: int = typer.Option(0, "--seed"),
    device: str = typer.Option(None, "--device", help=_DEVICE_HELP),
    model_dtype: str = typer.Option(None, "--model-dtype", help="float32 | bfloat16 | float16"),
):
    """DIEKÆ 3.4: edit facts into the encoders (no knowledge input); ES / PS / NS before and after."""
    from kcache.edit import EditConfig, edit, markdown_edit
    from kcache.models import load_decoder

    with _errors():
        ensure_writable_dir(out)  # before loading the model or training
        if not from_scratch and encoders is None:
            raise ValueError("give --encoders DIR or --from-scratch")
        cfg = EditConfig(epochs=epochs, batch_size=batch_size, lr_max=lr, lr_min=lr_min, max_steps=max_steps, max_edits=max_edits,
                         eval_split=eval_split, max_eval_edits=max_eval_edits, seed=seed, from_scratch=from_scratch, layers=layers, site=site)
        decoder = load_decoder(model, device=device, dtype=model_dtype)
        res = edit(decoder, samples, out, encoders, cfg, progress=True)
    typer.echo(markdown_edit(res))
    typer.echo(f"wrote {out}/edit.json, edit.md, edit.png and the edited bundle")


def register(app: typer.Typer) -> None:
    """Add ``finetune`` and ``edit`` to ``app``."""
    app.command("finetune")(finetune_cmd)
    app.command("edit")(edit_cmd)
