"""Options and help texts shared by several commands."""

from __future__ import annotations

import typer

MODEL_HELP = "hub id, local HF directory, .gguf file, or smollm2-135m"
DEVICE_HELP = "cpu | cuda | cuda:N (default: cuda when available)"

ModelOpt = typer.Option("smollm2-135m", "--model", "-m", help=MODEL_HELP)
DeviceOpt = typer.Option(None, "--device", help=DEVICE_HELP)
DtypeOpt = typer.Option(None, "--model-dtype",
                        help="float32 | bfloat16 | float16 (default: bfloat16 on cuda and on CPUs with native bf16, "
                             "else float32; KCACHE_COMPUTE=float32 forces float32)")
