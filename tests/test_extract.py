"""Stage one: the exactness invariant, batch invariance, resume, validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kcache.align import pad_right
from kcache.cache import Cache
from kcache.extract import ExtractConfig, capture, extract, make_plan, run_blocks
from kcache.inject import add_at_site


def _activations(decoder, seqs, site, layer, additions=None):
    ids, mask = pad_right(seqs, decoder.tokenizer.pad_token_id)
    with (torch.no_grad(), add_at_site(decoder, site, additions or {}),
          capture(decoder, site, [layer], stop=False) as acts):
        run_blocks(decoder, ids, mask)
    return acts[layer].float()


@pytest.mark.parametrize("site", ["mlp", "block"])
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_injecting_cached_delta_reproduces_pass_b(tiny_decoder, demo_samples, tmp_path, site, dtype):
    layer = 2
    # the single-layer invariant of independent targets, at every input position (sink 0)
    cfg = ExtractConfig(layers=[1, layer], site=site, dtype=dtype, token_budget=256, targets="independent", sink=0)
    extract(tiny_decoder, demo_samples, tmp_path / "c.zarr", cfg, progress=False)
    cache = Cache.open(tmp_path / "c.zarr")
    n = cache.num_samples
    assert n == demo_samples.num_rows
    worst = 0.0
    for i in range(0, n, 3):
        toks, shift = cache.encoder_tokens(i)
        toks = toks.tolist()
        k_ids, x_ids = toks[:shift], toks[shift:]
        delta = torch.from_numpy(cache.deltas(i, layer))[None]
        act_b = _activations(tiny_decoder, [k_ids + x_ids], site, layer)[0, shift:]
        act_a = _activations(tiny_decoder, [x_ids], site, layer)[0]
        injected = _activations(tiny_decoder, [x_ids], site, layer, {layer: delta})[0]
        scale = act_b.abs().max().item()
        err = (injected - act_b).abs().max().item()
        # without injection the passes really differ at input positions
        assert (act_a - act_b).abs().max().item() > 100 * (err + 1e-7)
        worst = max(worst, err / scale)
    tol = 2e-3 if dtype == "float16" else 1e-5  # float16: half an ulp of the delta, relative to the activation
    assert worst < tol, worst


def test_batch_size_one_equals_batched(tiny_decoder, demo_samples, tmp_path):
    big = ExtractConfig(layers="0-3", dtype="float32", token_budget=4096)
    one = ExtractConfig(layers="0-3", dtype="float32", token_budget=1)
    extract(tiny_decoder, demo_samples, tmp_path / "a.zarr", big, progress=False)
    extract(tiny_decoder, demo_samples, tmp_path / "b.zarr", one, progress=False)
    a, b = Cache.open(tmp_path / "a.zarr"), Cache.open(tmp_path / "b.zarr")
    assert len(make_plan(tiny_decoder.tokenizer, demo_samples,
                         big).batches) < len(make_plan(tiny_decoder.tokenizer, demo_samples, one).batches)
    for layer in range(4):
        x, y = a.read_rows(layer, 0, a.total_rows), b.read_rows(layer, 0, b.total_rows)
        assert x.shape == y.shape
        np.testing.assert_allclose(x, y, rtol=0, atol=1e-5 * np.abs(x).max())


def test_a_cache_is_not_resumed_or_reused_by_a_decoder_of_another_dtype(saved_model, demo_samples, tmp_path):
    """The default decoder dtype depends on the hardware (bf16 where it is fast): a float32 cache
    met by a bf16 decoder is refused, naming both, whether finalized or interrupted."""
    from kcache.errors import CacheError
    from kcache.models import load_decoder

    f32 = load_decoder(str(saved_model), device="cpu", dtype="float32")
    bf16 = load_decoder(str(saved_model), device="cpu", dtype="bfloat16")
    cfg = ExtractConfig(layers="1-2", dtype="float32")
    out = tmp_path / "c.zarr"
    extract(f32, demo_samples, out, cfg, progress=False)
    assert extract(f32, demo_samples, out, cfg, progress=False).status == "already complete"
    with pytest.raises(CacheError, match=r"extracted with the decoder in float32, the decoder is loaded in bfloat16"):
        extract(bf16, demo_samples, out, cfg, progress=False)
    # an interrupted one: the part without its manifest
    part = tmp_path / "p.zarr"
    extract(f32, demo_samples, part, cfg, progress=False)
    (part / "manifest.json").chmod(0o644)
    (part / "manifest.json").unlink()
    with pytest.raises(CacheError, match=r"pass --model-dtype float32"):
        extract(bf16, demo_samples, part, cfg, progress=False)


def test_the_inline_and_background_writers_write_the_same_cache(tiny_decoder, demo_samples, tmp_path, monkeypatch):
    """The delta writer runs in the caller's thread when torch uses every core, on its own thread
    otherwise (kcache.extract.write_in_background); both write the same arrays and statistics."""
    import kcache.extract as X

    cfg = ExtractConfig(layers="1-2", dtype="float16", token_budget=256, chunk_rows=16, shard_rows=32)
    caches = {}
    for background in (True, False):
        monkeypatch.setattr(X, "write_in_background", lambda device, b=background: b)
        extract(tiny_decoder, demo_samples, tmp_path / f"bg{background}", cfg, progress=False)
        caches[background] = Cache.open(tmp_path / f"bg{background}")
    a, b = caches[True], caches[False]
    assert a.total_rows == b.total_rows > 32  # more than one shard
    for layer in (1, 2):
        np.testing.assert_array_equal(a.read_rows(layer, 0, a.total_rows), b.read_rows(layer, 0, b.total_rows))
    assert a.attrs["stats"] == b.attrs["stats"]
    raw = a.read_rows(1, 0, 40, widen=False)  # float16 rows as stored, the same values
    assert raw.dtype == np.float16 and np.array_equal(raw.astype(np.float32), a.read_rows(1, 0, 40))
    assert a.read_rows(1, 5, 5, widen=False).dtype == np.float16
    monkeypatch.undo()
    from kcache import runtime

    monkeypatch.setattr(runtime, "available_cores", lambda: torch.get_num_threads())
    assert not X.write_in_background(torch.device("cpu"))  # every core runs a torch thread: inline
    monkeypatch.setattr(runtime, "available_cores", lambda: torch.get_num_threads() + 1)
    assert X.write_in_background(torch.device("cpu"))
    assert X.write_in_background(torch.device("cuda"))
