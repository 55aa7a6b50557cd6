"""One config path (kcache/config.py): every pipelines/**/*.toml builds the way `kcache run` builds
it; unknown keys, doubled aliases and wrong types are refused naming the file, the section and the
key. Nothing here loads a model."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from kcache.config import ConfigError, config_from, configs_from
from kcache.errors import KCacheError
from kcache.pipeline import ConvertOptions, RunOptions, SynthOptions, load_pipeline

ROOT = Path(__file__).resolve().parents[1]
PIPELINES = sorted((ROOT / "pipelines").rglob("*.toml"))
DEMO = ROOT / "pipelines" / "demo.toml"


def test_config_error_is_a_kcache_value_error():
    assert issubclass(ConfigError, KCacheError) and issubclass(ConfigError, ValueError)


# ---------------------------------------------------------------------------------------------
# (a) every pipeline in the repository builds


def test_the_repository_has_pipelines():
    assert DEMO in PIPELINES and len(PIPELINES) >= 2


@pytest.mark.parametrize("path", PIPELINES, ids=lambda p: str(p.relative_to(ROOT / "pipelines")))
def test_every_pipeline_builds(path):
    from kcache.edit import EditConfig
    from kcache.extract import ExtractConfig
    from kcache.finetune import FinetuneConfig
    from kcache.fit import FitConfig
    from kcache.stages import EvaluateOptions, StageIO

    raw = tomllib.loads(path.read_text())
    built = load_pipeline(path)
    assert built["raw"] == raw and built["path"] == path
    assert isinstance(built["run"], RunOptions) and built["run"].dir == raw["run"]["dir"]
    assert isinstance(built["data"], (Path, ConvertOptions, SynthOptions))
    kinds = {"extract": ExtractConfig, "fit": FitConfig}
    for section in ("extract", "fit", "finetune", "evaluate", "edit"):
        assert (section in built) == (section in raw), section
    for section, cls in kinds.items():
        if section in raw:
            assert isinstance(built[section], cls)
    if "finetune" in raw:
        fcfg, io = built["finetune"]
        assert isinstance(fcfg, FinetuneConfig) and isinstance(io, StageIO)
    if "evaluate" in raw:
        opts, edit = built["evaluate"]
        assert isinstance(opts, EvaluateOptions)
        assert (edit is None) == ("edit" not in raw["evaluate"])
        if edit is not None:
            assert isinstance(edit[0], EditConfig)
    for section in ("fit", "finetune"):  # the alias reached the field
        if section in raw and "lr" in raw[section]:
            cfg = built[section] if section == "fit" else built[section][0]
            assert cfg.lr_max == raw[section]["lr"]


# ---------------------------------------------------------------------------------------------
# (b) an unknown key in any section of demo.toml names the file, the section and the key


def _inject(text: str, section: str, line: str) -> str:
    """``line`` (``key = value``) set in ``[section]`` of ``text``: it replaces the key's line when
    the section has one, else it is added under the header (a table added at the end when absent)."""
    header, key = f"[{section}]", line.split("=")[0].strip()
    lines = text.splitlines()
    for i, l in enumerate(lines):
        if l.split("#")[0].strip() == header:
            j = i + 1
            while j < len(lines) and not lines[j].lstrip().startswith("["):
                if lines[j].split("=")[0].strip() == key:
                    return "\n".join(lines[:j] + [line] + lines[j + 1:]) + "\n"
                j += 1
            return "\n".join(lines[: i + 1] + [line] + lines[i + 1:]) + "\n"
    return text + f"\n{header}\n{line}\n"


SECTIONS = ["run", "data", "data.synth", "extract", "fit", "finetune", "evaluate", "evaluate.edit", "edit"]


def _demo_with(tmp_path, section: str, line: str) -> Path:
    text = DEMO.read_text()
    assert 'dir = "runs/demo"' in text
    text = text.replace('dir = "runs/demo"', f'dir = "{tmp_path / "run"}"')
    if section == "data.synth":  # an inline table: replaced by one holding ``line``
        synth = "synth = { n = 1200, seed = 0, distractors = 3 }"
        assert synth in text
        text = text.replace(synth, f"synth = {{ {line} }}")
    else:
        text = _inject(text, section, line)
    path = tmp_path / "demo.toml"
    path.write_text(text)
    return path


def test_the_demo_copy_builds_unchanged(tmp_path):
    path = tmp_path / "demo.toml"
    path.write_text(DEMO.read_text())
    load_pipeline(path)


@pytest.mark.parametrize("section", SECTIONS)
def test_unknown_key_names_file_section_and_key(tmp_path, section):
    path = _demo_with(tmp_path, section, "bogus_key = 1")
    with pytest.raises(ConfigError) as e:
        load_pipeline(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}: [{section}] unknown key 'bogus_key'"), msg
    assert "known: " in msg


@pytest.mark.parametrize("section", ["fit", "finetune"])
def test_a_value_the_settings_refuse_names_file_and_section(tmp_path, section):
    path = _demo_with(tmp_path, section, "length_groups = -1")
    with pytest.raises(ConfigError) as e:
        load_pipeline(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}: [{section}] length_groups must be >= 0"), msg
    assert "not -1" in msg


def test_a_typo_gets_a_suggestion_and_the_known_keys(tmp_path):
    path = _demo_with(tmp_path, "fit", "lr_maxx = 1e-3")
    with pytest.raises(ConfigError) as e:
        load_pipeline(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}: [fit] unknown key 'lr_maxx' (did you mean 'lr_max'? known: "), msg
    assert "epochs" in msg and "aliases: lr = lr_max" in msg


def test_kcache_run_reports_the_file(tmp_path):
    from typer.testing import CliRunner

    from kcache.cli import app

    path = _demo_with(tmp_path, "fit", "lr_maxx = 1e-3")
    r = CliRunner().invoke(app, ["run", str(path)], terminal_width=1000)
    assert r.exit_code == 2, (r.output, r.exception)
    lines = [l for l in r.output.splitlines() if l.startswith("error: ")]
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}: [fit] unknown key 'lr_maxx'"), r.output
    assert not (tmp_path / "run").exists()  # refused before any stage ran


def test_unknown_section_and_missing_run_dir_name_the_file(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text('[run]\ndir = "r"\n[fitt]\nepochs = 1\n')
    with pytest.raises(ConfigError, match=re.escape(f"{path}: unknown section(s) ['fitt']")):
        load_pipeline(path)
    path.write_text('[run]\nmodel = "m"\n')
    with pytest.raises(ConfigError, match=re.escape(f"{path}: [run] dir")):
        load_pipeline(path)
    path.write_text('[run]\ndir = "r"\nfit = 3\n')  # a key of [run], not a section
    with pytest.raises(ConfigError, match=re.escape(f"{path}: [run] unknown key 'fit'")):
        load_pipeline(path)


def test_data_takes_one_source(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text('[run]\ndir = "r"\n[data]\nsamples = "s.parquet"\nsynth = { n = 10 }\n')
    with pytest.raises(ConfigError,
                       match=re.escape(f"{path}: [data] give one of samples, convert, synth, not samples and synth")):
        load_pipeline(path)
    path.write_text('[run]\ndir = "r"\n[data]\nconvert = { input = "x.json" }\n')
    with pytest.raises(ConfigError, match=re.escape(f"{path}: [data.convert] missing key 'name'")):
        load_pipeline(path)
    path.write_text('[run]\ndir = "r"\n')
    assert load_pipeline(path)["data"] == SynthOptions()


# ---------------------------------------------------------------------------------------------
# (c) lr -> lr_max


def test_lr_is_lr_max_everywhere_it_applies():
    from kcache.edit import EditConfig
    from kcache.finetune import FinetuneConfig
    from kcache.fit import FitConfig
    from kcache.stages import StageIO

    assert config_from(FitConfig, {"lr": 3e-4}, "fit").lr_max == 3e-4
    assert config_from(FitConfig, {"lr_max": 3e-4}, "fit").lr_max == 3e-4
    assert config_from(FinetuneConfig, {"lr": 2e-4}, "finetune").lr_max == 2e-4
    ecfg, io = configs_from((EditConfig, StageIO), {"lr": 1e-3, "out": "o"}, "edit")
    assert ecfg.lr_max == 1e-3 and io.out == "o"
    assert config_from(FitConfig, {"lr": 1}, "fit").lr_max == 1.0  # an integer is a number


def test_lr_where_there_is_no_lr_max_is_an_unknown_key():
    from kcache.extract import ExtractConfig

    with pytest.raises(ConfigError, match=r"\[extract\] unknown key 'lr'"):
        config_from(ExtractConfig, {"lr": 1e-3}, "extract")


@pytest.mark.parametrize("section", ["fit", "finetune", "evaluate.edit"])
def test_lr_and_lr_max_together_are_refused(tmp_path, section):
    path = _demo_with(tmp_path, section, "lr_max = 1e-3")
    if section == "evaluate.edit":
        path.write_text(_inject(path.read_text(), section, "lr = 1e-3"))
    with pytest.raises(ConfigError) as e:
        load_pipeline(path)
    assert str(e.value).startswith(f"{path}: [{section}] both 'lr' and 'lr_max' given"), str(e.value)


def test_alias_in_the_demo_pipeline(tmp_path):
    built = load_pipeline(DEMO)
    assert built["fit"].lr_max == 5e-4 and built["finetune"][0].lr_max == 5e-4


# ---------------------------------------------------------------------------------------------
# (d) wrong types name section.key


@pytest.mark.parametrize("section,line,where,expected", [
    ("run", "model = 3", "run.model", "a string"),
    ("data.synth", "n = \"10\"", "data.synth.n", "an integer"),
    ("extract", "max_length = 1.5", "extract.max_length", "an integer"),
    ("extract", "layers = 3", "extract.layers", "a string or a list of integers"),
    ("fit", "epochs = \"three\"", "fit.epochs", "an integer"),
    ("fit", "epochs = true", "fit.epochs", "an integer"),
    ("fit", "lr_min = \"1e-5\"", "fit.lr_min", "a number"),
    ("fit", "layers = \"3-8\"", "fit.layers", "a list of integers"),
    ("finetune", "betas = [0.9]", "finetune.betas", "a list of 2 numbers"),
    ("finetune", "from_scratch = 1", "finetune.from_scratch", "true or false"),
    ("evaluate", "oracle = \"yes\"", "evaluate.oracle", "true or false"),
    ("evaluate", "limit = \"all\"", "evaluate.limit", "an integer"),
    ("evaluate", "edit = 3", "evaluate.edit", "a table"),
    ("evaluate.edit", "max_edits = \"12\"", "evaluate.edit.max_edits", "an integer"),
    ("edit", "out = 5", "edit.out", "a string"),
])
def test_wrong_type_names_section_and_key(tmp_path, section, line, where, expected):
    path = _demo_with(tmp_path, section, line)
    with pytest.raises(ConfigError) as e:
        load_pipeline(path)
    assert str(e.value).startswith(f"{path}: {where}: expected {expected}, got "), str(e.value)


def test_split_sizes_are_three_integers(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text('[run]\ndir = "r"\n[data]\nconvert = { name = "dream", input = "d.json", '
                    'split_sizes = [600, 100] }\n')
    with pytest.raises(ConfigError, match=re.escape(f"{path}: data.convert.split_sizes: "
                                                    "expected a list of 3 integers, got [600, 100]")):
        load_pipeline(path)


def test_values_are_converted():
    from kcache.finetune import FinetuneConfig

    cfg = config_from(FinetuneConfig, {"betas": [0.8, 1], "layers": [1, 2], "max_length": 64}, "finetune")
    assert cfg.betas == (0.8, 1.0) and isinstance(cfg.betas, tuple) and cfg.layers == [1, 2]
    assert config_from(FinetuneConfig, {"layers": "1-2"}, "finetune").layers == "1-2"
    # options from code may say None
    assert config_from(FinetuneConfig, {"max_train_samples": None}, "finetune").max_train_samples is None


def test_messages_without_a_file_start_with_the_section():
    from kcache.fit import FitConfig

    with pytest.raises(ConfigError, match=r"^\[fit\] unknown keys 'a', 'b' \(known: "):
        config_from(FitConfig, {"a": 1, "b": 2}, "fit")
    with pytest.raises(ConfigError, match=r"^fit\.epochs: expected an integer, got 'x' \(str\)$"):
        config_from(FitConfig, {"epochs": "x"}, "fit")
    with pytest.raises(ConfigError, match=r"^\[fit\] must be a table"):
        config_from(FitConfig, 3, "fit")


def test_one_stage_table_orders_the_pipeline_and_names_the_sections(tmp_path):
    from kcache.pipeline import STAGES, Stage

    assert list(STAGES) == ["data", "extract", "fit", "finetune", "evaluate", "edit"]
    assert all(isinstance(s, Stage) and callable(s.options) and callable(s.run) for s in STAGES.values())
    path = tmp_path / "p.toml"
    path.write_text('[run]\ndir = "x"\n[fitt]\nepochs = 1\n')
    with pytest.raises(ConfigError, match=r"unknown section\(s\) \['fitt'\]; expected run, data, extract, fit, "
                                          r"finetune, evaluate, edit"):
        load_pipeline(path)
