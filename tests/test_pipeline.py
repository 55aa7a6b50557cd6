"""``kcache run``: a whole tiny pipeline, then a rerun that skips every stage without loading the
decoder for extraction and keeps the real stage times in report.json."""

from __future__ import annotations

import json

import pytest


@pytest.fixture
def tiny_pipeline(tmp_path, saved_model):
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(f"""
[run]
dir = "{tmp_path / 'run'}"
model = "{saved_model}"
device = "cpu"

[data]
synth = {{ n = 30, seed = 1, distractors = 1 }}

[extract]
layers = "1-2"
dtype = "float32"

[fit]
epochs = 1
batch_size = 4
hidden_size = 16
num_layers = 1
num_heads = 2
intermediate_size = 32
eval_every = 3

[evaluate]
split = "test"
oracle = true
""")
    return cfg


def test_rerun_skips_every_stage_and_keeps_their_times(tiny_pipeline, tmp_path, monkeypatch):
    from kcache import models
    from kcache.pipeline import run_pipeline

    first = run_pipeline(tiny_pipeline, log=lambda m: None)
    assert first["skipped"] == []
    ev = json.loads((tmp_path / "run" / "eval" / "evaluation.json").read_text())
    assert "kx" in ev["controls"] and "knowledge_use" in ev["controls"]["ekx_fit"]
    assert ev["settings"]["targets"] == "cascade" and ev["settings"]["sink"] == 1

    loads = []
    real = models.load_decoder
    monkeypatch.setattr(models, "load_decoder", lambda *a, **k: loads.append(a) or real(*a, **k))
    second = run_pipeline(tiny_pipeline, log=lambda m: None)
    assert set(second["skipped"]) == {"extract", "fit", "evaluate"}
    for stage in ("extract", "fit", "evaluate"):
        assert second["seconds"][stage] == first["seconds"][stage]
    assert loads == []  # nothing needed the decoder: extraction was skipped from the report's key


def test_changed_extract_settings_are_not_skipped(tiny_pipeline, tmp_path):
    from kcache.pipeline import run_pipeline

    run_pipeline(tiny_pipeline, log=lambda m: None)
    text = tiny_pipeline.read_text().replace('layers = "1-2"', 'layers = "1-2"\nsink = 0')
    tiny_pipeline.write_text(text)
    with pytest.raises(Exception, match="different settings"):
        # the finalized cache is immutable: refused, not silently reused
        run_pipeline(tiny_pipeline, log=lambda m: None)


def test_unknown_key_in_a_pipeline_section_is_named(tmp_path):
    from kcache.pipeline import run_pipeline

    cfg = tmp_path / "bad.toml"
    cfg.write_text(f'[run]\ndir = "{tmp_path / "r"}"\n[data]\nsynth = {{ n = 10 }}\n[extract]\nlayer = "1-2"\n')
    with pytest.raises(ValueError, match=r"bad\.toml: \[extract\] unknown key 'layer' \(did you mean 'layers'\?"):
        run_pipeline(cfg, log=lambda m: None)
    assert not (tmp_path / "r").exists()  # refused before any stage ran
