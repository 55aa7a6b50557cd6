"""Training the encoders: ``fit-encoders`` (stage two, from the cache), ``finetune`` (DIEKÆ 3.3)
and ``edit`` (DIEKÆ 3.4). Thin layers over :mod:`kcache.fit`, :mod:`kcache.finetune`, :mod:`kcache.edit`.
"""

from __future__ import annotations

from pathlib import Path

import typer

from kcache.cli._options import DEVICE_HELP, MODEL_HELP, DeviceOpt
from kcache.cli.errors import ensure_writable_dir, errors

LENGTH_GROUPS_HELP = ("batches drawn from windows of this many batches of shuffled samples, each sorted by "
                      "length (less padding); 0 = plain shuffled batches")
COMPUTE_HELP = ("matmul precision under autocast, float32 master weights: auto (bf16 on CUDA and on CPUs "
                "with native bf16, float32 elsewhere) | float32 | bfloat16")


def fit_cmd(
    cache: str = typer.Option(..., "--cache", "-c", help="stage-one cache directory or URL"),
    out: Path = typer.Option(..., "--out", "-o", help="encoder bundle directory (resumes if a checkpoint is there)"),
    layers: str = typer.Option(None, "--layers", help="subset of the cached layers (default: all)"),
    epochs: int = typer.Option(3, "--epochs"),
    batch_size: int = typer.Option(8, "--batch-size", help="samples per micro-batch"),
    grad_accum: int = typer.Option(1, "--grad-accum"),
    lr_max: float = typer.Option(1e-4, "--lr", help="peak learning rate (warm-up from --lr-min, cosine back to it)"),
    lr_min: float = typer.Option(1e-5, "--lr-min"),
    hidden_size: int = typer.Option(128, "--hidden-size"),
    num_layers: int = typer.Option(4, "--encoder-layers"),
    num_heads: int = typer.Option(4, "--heads"),
    intermediate_size: int = typer.Option(512, "--intermediate-size"),
    eval_every: int = typer.Option(50, "--eval-every", help="optimizer steps between validations"),
    patience: int = typer.Option(5, "--patience", help="validations without improvement before stopping"),
    buffer_samples: int = typer.Option(2048, "--buffer-samples", help="shuffling buffer size (bounds memory)"),
    seed: int = typer.Option(0, "--seed"),
    device: str = DeviceOpt,
    max_steps: int = typer.Option(None, "--max-steps"),
    parallel: str = typer.Option("layers", "--parallel",
                                 help="under torchrun/SLURM: 'layers' = each process trains its share of the layers"),
    compute: str = typer.Option("auto", "--compute", help=COMPUTE_HELP),
    length_groups: int = typer.Option(16, "--length-groups", help=LENGTH_GROUPS_HELP),
    verify: bool = typer.Option(None, "--verify/--no-verify",
                                help="check every file read against the manifest's sha256 before using it "
                                     "(default: on for URLs, off for local caches)"),
    stream_buffer_mb: int = typer.Option(512, "--stream-buffer-mb",
                                         help="memory for verified files when verifying (half of it reads ahead)"),
):
    """Stage two: train one encoder per cached layer from the cache alone (no decoder needed).

    Under torchrun (``torchrun --nproc-per-node N -m kcache fit-encoders ...``) process r trains
    layers[r::N]; the bundle is the same as a single process would write.
    """
    from kcache.align import parse_layers
    from kcache.cache.stream import open_streaming
    from kcache.fit import FitConfig, fit_encoders, summary_table

    with errors():
        ensure_writable_dir(out, "encoder bundle directory")  # before any training
        lay = parse_layers(layers, 10**6) if layers else None
        cfg = FitConfig(layers=lay, epochs=epochs, batch_size=batch_size, grad_accum=grad_accum, lr_max=lr_max,
                        lr_min=lr_min, hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads,
                        intermediate_size=intermediate_size,
                        eval_every=eval_every, patience=patience, buffer_samples=buffer_samples, seed=seed,
                        device=device, max_steps=max_steps, parallel=parallel, compute=compute, verify=verify,
                        length_groups=length_groups,
                        stream_buffer_mb=stream_buffer_mb)
        # opened (remotely: every file verified) once, before any output is made, and trained from as opened
        summary = fit_encoders(open_streaming(cache, verify, stream_buffer_mb), out, cfg)
    from kcache import distributed

    if not distributed.is_main():
        return
    typer.echo(summary_table(summary))
    typer.echo(f"best step {summary['best_step']} of {summary['steps']} ({summary['stopped']}); "
               f"{summary['wall_seconds']:.0f} s, "
               f"{summary['data_wait_seconds'] / max(summary['wall_seconds'], 1e-9):.1%} waiting for data")
    typer.echo(f"bundle: {out}/ (config.json, encoders.safetensors); curves: {out}/curves.png")


def _common(epochs, batch_size, grad_accum, lr, lr_min, eval_every, patience, max_steps, seed, from_scratch,
            layers, site, max_length, max_train_samples, val_max_samples) -> dict:
    d = dict(epochs=epochs, batch_size=batch_size, grad_accum=grad_accum, lr_max=lr, lr_min=lr_min,
             eval_every=eval_every, patience=patience,
             max_steps=max_steps, seed=seed, from_scratch=from_scratch, layers=layers, site=site, max_length=max_length)
    if max_train_samples is not None:
        d["max_train_samples"] = max_train_samples
    if val_max_samples is not None:
        d["val_max_samples"] = val_max_samples
    return d


def finetune_cmd(
    samples: Path = typer.Option(..., "--samples", "-s",
                                 help="samples .parquet or .jsonl (train split trains, validation split selects)"),
    encoders: Path = typer.Option(None, "--encoders", "-e", help="fitted encoder bundle to start from"),
    out: Path = typer.Option(..., "--out", "-o", help="output bundle directory (resumes if a checkpoint is there)"),
    from_scratch: bool = typer.Option(False, "--from-scratch",
                                      help="freshly initialised encoders (paper 6.2 ablation); site/layers from flags"),
    layers: str = typer.Option(None, "--layers",
                               help="layers (from scratch: default 3-8; with --encoders: a subset of the bundle's)"),
    site: str = typer.Option("block", "--site", help="from scratch: block | mlp"),
    model: str = typer.Option("smollm2-135m", "--model", "-m", help=MODEL_HELP),
    epochs: int = typer.Option(1, "--epochs"),
    batch_size: int = typer.Option(8, "--batch-size"),
    grad_accum: int = typer.Option(1, "--grad-accum"),
    lr: float = typer.Option(1e-4, "--lr", help="peak learning rate (warm-up from --lr-min, cosine back to it)"),
    lr_min: float = typer.Option(1e-5, "--lr-min"),
    eval_every: int = typer.Option(50, "--eval-every", help="optimizer steps between validations"),
    patience: int = typer.Option(5, "--patience"),
    max_steps: int = typer.Option(None, "--max-steps"),
    max_train_samples: int = typer.Option(None, "--max-train-samples"),
    val_max_samples: int = typer.Option(None, "--val-max-samples",
                                        help="validation samples used for selection (default 256)"),
    max_length: int = typer.Option(None, "--max-length",
                                   help="bound on len(k_ids + x_ids) (default: the bundle's, 1024 from scratch)"),
    seed: int = typer.Option(0, "--seed"),
    device: str = typer.Option(None, "--device", help=DEVICE_HELP),
    model_dtype: str = typer.Option(None, "--model-dtype", help="float32 | bfloat16 | float16"),
    objective: str = typer.Option("ce", "--objective",
                                  help="ce (target cross-entropy, the paper's) | kl (KL to D(K,x) at every input "
                                       "position) | ce+kl"),
    compute: str = typer.Option("auto", "--compute", help=COMPUTE_HELP),
    length_groups: int = typer.Option(16, "--length-groups", help=LENGTH_GROUPS_HELP),
):
    """DIEKÆ 3.3: fine-tune encoders through the frozen decoder (target cross-entropy, or KL to D(K,x))."""
    from kcache.finetune import FinetuneConfig, finetune
    from kcache.models import load_decoder

    with errors():
        ensure_writable_dir(out, "output bundle directory")  # before loading the model or training
        cfg = FinetuneConfig(**_common(epochs, batch_size, grad_accum, lr, lr_min, eval_every, patience, max_steps,
                                       seed, from_scratch, layers, site, max_length, max_train_samples,
                                       val_max_samples),
                             objective=objective, compute=compute, length_groups=length_groups)
        if not from_scratch and encoders is None:
            raise ValueError("give --encoders DIR (a fitted bundle) or --from-scratch")
        decoder = load_decoder(model, device=device, dtype=model_dtype)
        s = finetune(decoder, samples, encoders, out, cfg, progress=True, log=typer.echo)
    if s.get("skipped"):
        typer.echo(f"{out}: already complete for these settings")
    typer.echo(f"validation perplexity (target tokens): {s['val_ppl_start']:.3f} at step 0 -> {s['val_ppl_best']:.3f} "
               f"at step {s['best_step']} of {s['steps']}")
    typer.echo(f"bundle: {out}/ (config.json, encoders.safetensors); history: "
               f"{out}/history.json; curve: {out}/curves.png")


def edit_cmd(
    samples: Path = typer.Option(..., "--samples", "-s",
                                 help="samples with target_true (+ paraphrases, neighbours), e.g. the demo set or "
                                      "CounterFact"),
    out: Path = typer.Option(..., "--out", "-o", help="output directory: edited bundle, edit.json / .md / .png"),
    encoders: Path = typer.Option(None, "--encoders", "-e", help="encoder bundle to start from"),
    from_scratch: bool = typer.Option(False, "--from-scratch",
                                      help="freshly initialised encoders; site/layers from flags"),
    layers: str = typer.Option(None, "--layers", help="layers (from scratch: default 3-8)"),
    site: str = typer.Option("block", "--site"),
    model: str = typer.Option("smollm2-135m", "--model", "-m", help=MODEL_HELP),
    epochs: int = typer.Option(5, "--epochs"),
    batch_size: int = typer.Option(8, "--batch-size"),
    lr: float = typer.Option(5e-4, "--lr"),
    lr_min: float = typer.Option(1e-5, "--lr-min"),
    max_steps: int = typer.Option(None, "--max-steps"),
    max_edits: int = typer.Option(None, "--max-edits", help="first N edits of the train split"),
    eval_split: str = typer.Option("test", "--eval-split", help="held-out edits (never trained on)"),
    max_eval_edits: int = typer.Option(None, "--max-eval-edits"),
    seed: int = typer.Option(0, "--seed"),
    device: str = typer.Option(None, "--device", help=DEVICE_HELP),
    model_dtype: str = typer.Option(None, "--model-dtype", help="float32 | bfloat16 | float16"),
    compute: str = typer.Option("auto", "--compute", help=COMPUTE_HELP),
):
    """DIEKÆ 3.4: edit facts into the encoders (no knowledge input); ES / PS / NS before and after."""
    from kcache.edit import EditConfig, edit, markdown_edit
    from kcache.models import load_decoder

    with errors():
        ensure_writable_dir(out)  # before loading the model or training
        if not from_scratch and encoders is None:
            raise ValueError("give --encoders DIR or --from-scratch")
        cfg = EditConfig(epochs=epochs, batch_size=batch_size, lr_max=lr, lr_min=lr_min, max_steps=max_steps,
                         max_edits=max_edits, eval_split=eval_split, max_eval_edits=max_eval_edits, seed=seed,
                         from_scratch=from_scratch, layers=layers, site=site, compute=compute)
        decoder = load_decoder(model, device=device, dtype=model_dtype)
        res = edit(decoder, samples, out, encoders, cfg, progress=True)
    typer.echo(markdown_edit(res))
    typer.echo(f"wrote {out}/edit.json, edit.md, edit.png and the edited bundle")
