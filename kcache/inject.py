"""Stage three: adding knowledge to a frozen decoder at chosen layers and sites.

The low-level primitive is ``add_at_site``: a forward hook that adds a tensor to the output of
the site module (``mlp``: the MLP output before the residual add; ``block``: the block output,
i.e. the residual stream) for every input position.
"""

from __future__ import annotations

import contextlib

import torch

from kcache.models import Decoder


@contextlib.contextmanager
def add_at_site(decoder: Decoder, site: str, additions: dict[int, torch.Tensor]):
    """Add ``additions[layer]`` (B, L, hidden), aligned to input positions, to the output of
    ``site`` at each layer while the context is open."""
    handles = []

    def make(delta):
        def hook(_mod, _inp, out):
            if isinstance(out, tuple):
                return (out[0] + delta.to(out[0].dtype),) + tuple(out[1:])
            return out + delta.to(out.dtype)
        return hook

    try:
        for layer, delta in additions.items():
            handles.append(decoder.layers.site_module(site, layer).register_forward_hook(make(delta)))
        yield
    finally:
        for h in handles:
            h.remove()
