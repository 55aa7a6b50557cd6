"""Stage two: encoders trained from the cache alone."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import tiny_dec

from kcache.cache import Cache, CacheError
from kcache.data.synth import synth_samples
from kcache.encoders import BundleError, EncoderConfig, EncoderStack, load_bundle
from kcache.extract import ExtractConfig, extract
from kcache.fit import (
    BatchLoader,
    CacheReader,
    FitConfig,
    evaluate_layers,
    fit_encoders,
    length_grouped_batches,
    lr_at,
    masked_mse,
    predict,
    shuffle_schedule,
)

TINY = dict(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64)


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory, tokenizer_nobos):
    out = tmp_path_factory.mktemp("fit") / "c.zarr"
    dec = tiny_dec("llama", tokenizer_nobos)
    extract(dec, synth_samples(60, seed=9), out, ExtractConfig(layers="1-2", dtype="float32", chunk_rows=64,
                                                               shard_rows=128), progress=False)
    return out


def test_lr_schedule_values():
    total, warm = 100, 10
    assert lr_at(0, total, warm, 1e-5, 1e-4) == pytest.approx(1e-5)
    assert lr_at(5, total, warm, 1e-5, 1e-4) == pytest.approx(5.5e-5)
    assert lr_at(10, total, warm, 1e-5, 1e-4) == pytest.approx(1e-4)
    assert lr_at(10 + 89 // 2, total, warm, 1e-5, 1e-4) == pytest.approx(5.5e-5, rel=0.02)
    assert lr_at(99, total, warm, 1e-5, 1e-4) == pytest.approx(1e-5)


@pytest.mark.parametrize("batch_size, accum", [(4, 1), (2, 2), (1, 4)])
def test_step_count_is_right_for_any_batching(tiny_cache, tmp_path, batch_size, accum):
    cfg = FitConfig(**TINY, epochs=2, batch_size=batch_size, grad_accum=accum, eval_every=1000, checkpoint_every=1000)
    s = fit_encoders(tiny_cache, tmp_path / "e", cfg, progress=False)
    n_train = int((np.array(Cache.open(tiny_cache).index["split"].to_pylist()) == "train").sum())
    assert s["steps"] == 2 * math.ceil(math.ceil(n_train / batch_size) / accum)
    hist = json.loads((tmp_path / "e" / "history.json").read_text())
    assert hist[-1]["lr"] == pytest.approx(1e-5)  # the last optimizer step lands on lr_min


def test_masked_positions_do_not_change_the_loss(tiny_cache):
    cache = Cache.open(tiny_cache)
    reader = CacheReader(cache, [1, 2])
    emb = cache.embeddings()
    stack = EncoderStack(EncoderConfig(d_model=cache.hidden_size, **TINY), [1, 2])
    for enc in stack.encoders.values():
        torch.nn.init.normal_(enc.up_proj.weight, std=0.1)
    batch = next(iter(BatchLoader(reader, np.arange(8), 8, 64, 0, 0)))
    assert (~batch.valid).any() and (~batch.loss_mask).any()
    def loss(b):
        return [float(masked_mse(p, b.targets[l], b.loss_mask).detach()) for l, p in predict(stack, emb, b).items()]

    before = loss(batch)
    batch.tokens[~batch.valid] = 7  # other padding token ids
    for t in batch.targets.values():
        t[~batch.loss_mask] = 1e3  # garbage where the mask is off
    assert loss(batch) == pytest.approx(before, rel=1e-6, abs=1e-9)


def test_stacked_training_equals_training_alone(tiny_cache, tmp_path):
    cfg = dict(**TINY, epochs=1, batch_size=4, eval_every=1000, checkpoint_every=1000)
    fit_encoders(tiny_cache, tmp_path / "both", FitConfig(**cfg), progress=False)
    fit_encoders(tiny_cache, tmp_path / "one", FitConfig(**cfg, layers=[2]), progress=False)
    both, _ = load_bundle(tmp_path / "both")
    one, _ = load_bundle(tmp_path / "one")
    a, b = both.encoder(2).state_dict(), one.encoder(2).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["up_proj.weight"], torch.zeros_like(a["up_proj.weight"]))


def test_resume_after_crash_gives_identical_weights(tiny_cache, tmp_path):
    cfg = FitConfig(**TINY, epochs=3, batch_size=4, eval_every=4, checkpoint_every=3)
    ref = fit_encoders(tiny_cache, tmp_path / "ref", cfg, progress=False)

    class Crash(Exception):
        pass

    def crash(step):
        if step == 17:  # last checkpoint at 15: steps 16-17 are lost, as after a SIGKILL
            raise Crash

    with pytest.raises(Crash):
        fit_encoders(tiny_cache, tmp_path / "run", cfg, progress=False, on_step=crash)
    state = json.loads((tmp_path / "run" / "checkpoint" / "state.json").read_text())
    assert state["step"] == 15 and 0 < state["batch_in_epoch"]  # the crash lands mid-epoch
    res = fit_encoders(tiny_cache, tmp_path / "run", cfg, progress=False)
    assert res["steps"] == ref["steps"] and res["best_step"] == ref["best_step"]
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "ref" / "checkpoint" / "model.safetensors"))
    b = load_file(str(tmp_path / "run" / "checkpoint" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    resumed, straight = tmp_path / "run" / "encoders.safetensors", tmp_path / "ref" / "encoders.safetensors"
    assert resumed.read_bytes() == straight.read_bytes()


def test_a_handful_of_samples_overfits(tmp_path, tokenizer_nobos):
    dec = tiny_dec("llama", tokenizer_nobos)
    extract(dec, synth_samples(16, seed=9), tmp_path / "c.zarr", ExtractConfig(layers="1-2", dtype="float32"),
            progress=False)
    cache = Cache.open(tmp_path / "c.zarr")
    cfg = FitConfig(**TINY, epochs=150, batch_size=4, lr_max=1e-3, eval_every=10_000, checkpoint_every=10_000,
                    warmup_fraction=0.02)
    fit_encoders(tmp_path / "c.zarr", tmp_path / "e", cfg, progress=False)
    stack, meta = load_bundle(tmp_path / "e")
    reader = CacheReader(cache, [1, 2])
    train = np.nonzero(np.array(cache.index["split"].to_pylist()) == "train")[0]
    assert len(train) == 13
    mean = {l: torch.zeros(cache.hidden_size) for l in [1, 2]}
    res = evaluate_layers(stack, cache.embeddings(), BatchLoader(reader, train, 8, 64, 0, 0, shuffle=False),
                          "cpu", mean, lambda: torch.autocast("cpu", enabled=False))
    for l in (1, 2):
        assert res[l]["fvu"] < 0.25, res  # from 1.0+ for the zero-initialised encoders
    assert meta["model"] == cache.model_fingerprint and meta["site"] == "block"


def test_outputs_and_summary(tiny_cache, tmp_path):
    s = fit_encoders(tiny_cache, tmp_path / "e", FitConfig(**TINY, epochs=1, batch_size=4, eval_every=5),
                     progress=False)
    for name in ("config.json", "encoders.safetensors", "summary.json", "history.json", "curves.png"):
        assert (tmp_path / "e" / name).exists(), name
    assert set(s["layers"]) == {"1", "2"} and all("verdict" in r for r in s["layers"].values())
    assert (tmp_path / "e" / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_shuffle_schedule_is_a_permutation_with_bounded_lookahead():
    rng = np.random.default_rng(0)
    blocks = [list(range(i * 10, i * 10 + 10)) for i in range(6)]
    order = shuffle_schedule(blocks, 15, rng)
    assert sorted(order) == list(range(60)) and order != list(range(60))
    # a sample can only leave after its block was read: position in stream bounds its output rank
    for rank, s in enumerate(order[:40]):
        assert s < rank + 16


@pytest.mark.parametrize("n,batch,groups", [(100, 8, 4), (64, 8, 16), (7, 3, 2), (50, 8, 1), (50, 8, 0)])
def test_length_grouped_batches_cover_every_sample_once_with_less_padding(n, batch, groups):
    rng = np.random.default_rng(3)
    lengths = rng.integers(5, 200, size=n)
    order = rng.permutation(n).tolist()
    got = length_grouped_batches(order, lengths, batch, groups, np.random.default_rng(1))
    assert sorted(s for b in got for s in b) == list(range(n))
    assert [len(b) for b in got[:-1]] == [batch] * (len(got) - 1) and 0 < len(got[-1]) <= batch
    plain = [order[i : i + batch] for i in range(0, n, batch)]
    padded = [sum(len(b) * max(lengths[b]) for b in bs) for bs in (got, plain)]
    if groups <= 1:
        assert got == plain
        return
    assert padded[0] < padded[1]
    window = groups * batch
    for b in got:  # each batch comes from one window of ``order``, sorted within it
        w = {order.index(s) // window for s in b}
        assert len(w) == 1
        assert list(lengths[b]) == sorted(lengths[b], reverse=True)
    # the same rng state gives the same batches (a resumed epoch), another gives another order
    assert length_grouped_batches(order, lengths, batch, groups, np.random.default_rng(1)) == got
    if groups >= 4:  # windows of >= 4 batches: two seeds giving the same orders would be a fluke
        assert length_grouped_batches(order, lengths, batch, groups, np.random.default_rng(2)) != got


def test_length_grouped_batches_take_tuples_and_keep_ties_in_order():
    lengths = [(3, 9), (5, 1), (3, 2), (5, 1), (3, 9)]
    got = length_grouped_batches([0, 1, 2, 3, 4], lengths, 5, 2, np.random.default_rng(0))
    assert got == [[1, 3, 0, 4, 2]]  # by the first entry, then the second; equal keys keep their order


def test_plain_batches_keep_the_run_identity_of_runs_made_before_length_groups():
    from kcache.train import run_settings

    assert "length_groups" not in FitConfig(length_groups=0).run_config()  # what a run made before it recorded
    assert FitConfig().run_config()["length_groups"] == 16
    assert "verify" not in FitConfig().run_config() and "length_groups" in run_settings(FitConfig(length_groups=4))


def test_loader_groups_by_knowledge_plus_input_length(tiny_cache):
    c = Cache.open(tiny_cache)
    r = CacheReader(c, c.layers)
    samples = np.arange(len(c.index))
    total = r.k_len + r.x_len
    seen = {}
    for g in (0, 4):
        loader = BatchLoader(r, samples, 4, 2048, 0, 0, length_groups=g)
        seen[g] = [b.samples for b in loader]
        loader.close()
        assert sorted(int(s) for b in seen[g] for s in b) == list(range(len(c.index)))
    plain = BatchLoader(r, samples, 4, 2048, 0, 0)
    assert [list(b) for b in seen[0]] == [list(b) for b in plain.batches]
    plain.close()
    pad = {g: sum(len(b) * int(total[list(b)].max()) for b in bs) for g, bs in seen.items()}
    assert pad[4] < pad[0]


def test_bad_inputs(tiny_cache, tmp_path):
    with pytest.raises(CacheError, match=r"layer\(s\) \[5\] not in this cache"):
        fit_encoders(tiny_cache, tmp_path / "e", FitConfig(**TINY, layers=[5]), progress=False)
    # a cache of another schema version
    import shutil

    import zarr

    other = tmp_path / "v2.zarr"
    shutil.copytree(tiny_cache, other)
    g = zarr.open_group(str(other), mode="r+")
    attrs = dict(g.attrs["kcache"])
    attrs["schema_version"] = 2
    g.attrs["kcache"] = attrs
    with pytest.raises(CacheError, match=r"v2\.zarr/zarr\.json: cache schema version 2, this kcache reads version 1"):
        fit_encoders(other, tmp_path / "e", FitConfig(**TINY), progress=False)
    # bundles: another model, corrupted weights
    fit_encoders(tiny_cache, tmp_path / "e", FitConfig(**TINY, epochs=1, batch_size=8), progress=False)
    fp = Cache.open(tiny_cache).model_fingerprint
    load_bundle(tmp_path / "e", fp)
    with pytest.raises(BundleError,
                       match=r"config\.json: encoders were trained for another model \(weights_hash differ"):
        load_bundle(tmp_path / "e", {**fp, "weights_hash": "sha256:other"})
    w = tmp_path / "e" / "encoders.safetensors"
    w.write_bytes(w.read_bytes()[:100])
    with pytest.raises(BundleError, match=r"encoders\.safetensors: cannot read encoder weights"):
        load_bundle(tmp_path / "e")


def test_corrupt_checkpoint_is_a_clear_error(tiny_cache, tmp_path):
    cfg = FitConfig(**TINY, epochs=1, batch_size=8, checkpoint_every=2)
    fit_encoders(tiny_cache, tmp_path / "e", cfg, progress=False)
    state = tmp_path / "e" / "checkpoint" / "state.json"
    doc = json.loads(state.read_text())
    assert doc["format"] == "kcache-checkpoint" and doc["schema_version"] == 1
    doc["step"] = "seven"
    state.write_text(json.dumps(doc))
    with pytest.raises(CacheError, match=r"checkpoint: unreadable checkpoint .*state\.json.*'step'"):
        fit_encoders(tiny_cache, tmp_path / "e", cfg, progress=False)


def test_publish_bundle_lands_beside_the_checkpoint_atomically(tiny_cache, tmp_path):
    """fit and finetune share one publish_bundle: the bundle's files replace those in out/, the rest stays."""
    from kcache.encoders import CONFIG_FILE, publish_bundle

    out = tmp_path / "e"
    fit_encoders(tiny_cache, out, FitConfig(**TINY, max_steps=1, eval_every=1000, checkpoint_every=1000),
                 progress=False)
    stack, _ = load_bundle(out)
    doc = json.loads((out / CONFIG_FILE).read_text())
    derived = ("format", "schema_version", "kcache_version", "encoder", "layers", "parameters_per_encoder")
    meta = {k: v for k, v in doc.items() if k not in derived}
    (out / "checkpoint-note").write_text("kept")
    with torch.no_grad():
        for p in stack.parameters():
            p.add_(1.0)
    assert publish_bundle(out, stack, {**meta, "created": "2000-01-01T00:00:00Z"}) == out
    again, _ = load_bundle(out)
    assert all(torch.equal(a, b) for a, b in zip(stack.state_dict().values(), again.state_dict().values()))
    assert json.loads((out / CONFIG_FILE).read_text())["created"] == "2000-01-01T00:00:00Z"
    assert (out / "checkpoint-note").read_text() == "kept"
    assert not [p.name for p in tmp_path.iterdir() if ".bundle." in p.name]  # no temporary left beside out


def test_reading_many_samples_at_once_gives_each_samples_rows(tiny_cache):
    """Cache.deltas_of (one read per chunk, the oracle's batches) == deltas() sample by sample, in any order;
    the loader's float16/float32 rows without widening are the same values."""
    c = Cache.open(tiny_cache)
    rng = np.random.default_rng(0)
    picks = [int(s) for s in rng.permutation(len(c.index))[:25]] + [3, 3]  # shuffled, one repeated
    for layer in (1, 2):
        got = c.deltas_of(picks, layer)
        assert len(got) == len(picks)
        for s, rows in zip(picks, got):
            np.testing.assert_array_equal(rows, c.deltas(s, layer))
        raw = c.read_rows(layer, 0, 100, widen=False)
        assert raw.dtype == np.float32 and np.array_equal(raw, c.read_rows(layer, 0, 100))
    assert c.deltas_of([], 1) == []


def test_validation_kept_in_memory_equals_validation_read_again(tiny_cache, tmp_path, monkeypatch):
    """Validation batches are kept after the first evaluation when they fit (fit.VAL_KEEP_BYTES); with
    no room they are read again each time. The history is the same either way."""
    import kcache.fit as fit_mod

    cfg = FitConfig(**TINY, epochs=2, batch_size=4, eval_every=3, checkpoint_every=1000)
    kept = fit_encoders(tiny_cache, tmp_path / "kept", cfg, progress=False)
    monkeypatch.setattr(fit_mod, "VAL_KEEP_BYTES", 0)
    reread = fit_encoders(tiny_cache, tmp_path / "reread", cfg, progress=False)
    a = json.loads((tmp_path / "kept" / "history.json").read_text())
    b = json.loads((tmp_path / "reread" / "history.json").read_text())
    assert len(a) >= 3 and a == b
    assert kept["layers"] == reread["layers"]


def test_reading_many_samples_at_once_across_the_parts_of_a_merged_cache(tiny_cache, tmp_path, tokenizer_nobos):
    """deltas_of groups by chunk within each part (parts' row bases need not be chunk aligned)."""
    from kcache.cache.merge import merge

    other = tmp_path / "b.zarr"
    extract(tiny_dec("llama", tokenizer_nobos), synth_samples(23, seed=3), other,
            ExtractConfig(layers="1-2", dtype="float32", chunk_rows=64, shard_rows=128), progress=False)
    merge([str(tiny_cache), str(other)], tmp_path / "m.zarr", progress=False)
    c = Cache.open(tmp_path / "m.zarr")
    assert len(c.parts) == 2 and int(c.row_base[1]) % 64  # the second part starts mid-chunk
    picks = [int(s) for s in np.random.default_rng(1).permutation(len(c.index))]
    for layer in (1, 2):
        for s, rows in zip(picks, c.deltas_of(picks, layer)):
            np.testing.assert_array_equal(rows, c.deltas(s, layer))
