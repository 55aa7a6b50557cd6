"""Dataset converters (kcache.data.convert): fixtures in each dataset's published layout, plus the
real raw files in ../shared/data when that folder is present."""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kcache.cli import app
from kcache.data.convert import CONVERTERS, ConvertError, convert, format_report, format_stats, infer_split, stats
from kcache.data.samples import SampleError, read_samples

FIX = Path(__file__).resolve().parent / "fixtures" / "datasets"
REAL = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _curiosity_dir(tmp_path: Path) -> Path:
    """The dialogs file next to a wiki_sql.sqlite.db built from the fixture's SQL script."""
    d = tmp_path / "curiosity"
    d.mkdir(exist_ok=True)
    shutil.copy(FIX / "curiosity" / "curiosity_dialogs.val.json", d)
    db = d / "wiki_sql.sqlite.db"
    if not db.exists():
        con = sqlite3.connect(db)
        con.executescript((FIX / "curiosity" / "wiki_sql.sql").read_text())
        con.commit()
        con.close()
    return d / "curiosity_dialogs.val.json"


def _run(tmp_path: Path, name: str, inp: Path | str, split: str | None = None, out: str = "out.parquet"):
    report = convert(name, inp, tmp_path / out, split)
    assert report.rows_in == report.rows_out + sum(report.dropped.values())
    rows = read_samples(tmp_path / out).to_pylist()
    assert len(rows) == report.rows_out
    return report, {r["id"]: r for r in rows}


# --------------------------------------------------------------------------- fixtures, one per converter


def test_dream(tmp_path):
    rep, rows = _run(tmp_path, "dream", FIX / "dream" / "dev.json")
    assert (rep.split, rep.rows_in, rep.rows_out, rep.dropped) == ("validation", 3, 2, {"answer not among choices": 1})
    r = rows["dream-validation-1-101-0"]
    assert r["knowledge"][0] == "M: Excuse me, is this the way to the harbour museum?"
    assert len(r["knowledge"]) == 4
    assert r["source"] == "[USR] When is the museum closed? [SYS]"
    assert r["target"] == " On Mondays."
    assert r["options"] == [" On Sundays.", " On Mondays.", " On Tuesdays."] and r["label"] == 1
    assert rows["dream-validation-1-101-1"]["label"] == 0
    assert json.loads(r["meta"]) == {"dialogue_id": "1-101", "question_index": 0}


@pytest.mark.parametrize("inp,split", [("cmu_dog/Conversations/valid", None), ("cmu_dog", "validation")])
def test_cmu_dog(tmp_path, inp, split):
    rep, rows = _run(tmp_path, "cmu_dog", FIX / inp, split)
    assert (rep.rows_in, rep.rows_out) == (8, 5)
    assert rep.dropped == {"conversation rating < 3": 2, "empty turn": 1}
    assert not any("b2low" in i for i in rows)
    first = rows["cmu_dog-validation-a1good-000"]
    assert first["source"] == "[SYS]" and first["target"] == " Hi! Have you seen Glass Harbour?"
    assert first["knowledge"][0].startswith("Glass Harbour (2011).\nDirector: Lena Morr\nGenre: "
                                            "Drama\nCast: Ana Ruiz as Mara Vell")
    # speaker-relative: user1's own earlier turns are [SYS], user2's are [USR]
    r = rows["cmu_dog-validation-a1good-003"]
    assert r["source"] == ("[SYS] Hi! Have you seen Glass Harbour? [USR] Not yet. "
                           "Who directed it? [SYS] Lena Morr did. [SYS]")
    assert r["knowledge"] == ["Mara lives alone at the lighthouse until her brother Joss arrives with news of a storm."]
    # and from user2's side; the blank turn 4 is neither a target nor in the history
    r = rows["cmu_dog-validation-a1good-005"]
    assert r["source"] == ("[USR] Hi! Have you seen Glass Harbour? [SYS] Not yet. Who directed it? "
                           "[USR] Lena Morr did. [USR] It starts with Mara alone at the lighthouse. [SYS]")
    assert r["target"] == " Sounds gloomy. What happens next?"
    assert r["knowledge"] == ["The storm cuts the island off and Joss admits he has lost the family boat."]
    assert json.loads(r["meta"])["speaker"] == "user2" and json.loads(r["meta"])["doc_idx"] == 2


def test_curiosity(tmp_path):
    rep, rows = _run(tmp_path, "curiosity", _curiosity_dir(tmp_path))
    assert (rep.rows_in, rep.rows_out) == (4, 3)
    assert rep.dropped == {"used fact missing from wiki_sql.sqlite.db": 1}
    r = rows["curiosity-validation-5001-01"]
    assert r["knowledge"] == ["Velmora is an island country in the northern sea."]  # used fact only, <ref> stripped
    assert r["source"] == "[USR] Hi, what can you tell me about Velmora? [SYS]"
    assert json.loads(r["meta"])["knowledge_is_target"] is False
    r = rows["curiosity-validation-5001-03"]  # no fact used: the reply itself, verbatim, flagged
    assert r["knowledge"] == ["I am not sure, but fishing matters a lot there."] == [r["target"].strip()]
    assert json.loads(r["meta"])["knowledge_is_target"] is True
    r = rows["curiosity-validation-5001-07"]
    assert r["knowledge"] == ["Velmora became independent in 1921.",
                              "Velmora is an island country in the northern sea."]
    assert r["source"].endswith("[USR] And its history? [SYS] It became independent after a long "
                                "dispute. [USR] Thanks! [SYS]")


def test_curiosity_needs_fact_db(tmp_path):
    shutil.copy(FIX / "curiosity" / "curiosity_dialogs.val.json", tmp_path)
    with pytest.raises(ConvertError, match=r"wiki_sql\.sqlite\.db.*does not exist"):
        convert("curiosity", tmp_path / "curiosity_dialogs.val.json", tmp_path / "o.parquet")


def test_natural_questions(tmp_path):
    rep, rows = _run(tmp_path, "natural_questions", FIX / "natural_questions" / "dev.json")
    assert (rep.rows_in, rep.rows_out, rep.dropped) == (3, 2, {"no short answer": 1})
    r = rows["natural_questions-validation-nq-7001"]
    assert r["knowledge"] == ["The Riverbend Bridge was completed in 1932 and spans the Ostra river."]
    assert r["source"] == "[USR] when was the riverbend bridge completed [SYS]" and r["target"] == " 1932"
    assert json.loads(rows["natural_questions-validation-nq-7003"]["meta"])["has_correct_context"] is False


@pytest.mark.parametrize("inp,split", [("quasar_t/questions/dev_questions.json", None), ("quasar_t", "dev")])
def test_quasar_t(tmp_path, inp, split):
    rep, rows = _run(tmp_path, "quasar_t", FIX / inp, split)
    assert (rep.split, rep.rows_in, rep.rows_out, rep.dropped) == ("validation", 3, 2, {"no contexts for question": 1})
    r = rows["quasar_t-validation-s3q1001"]
    assert r["knowledge"] == ["Tallinn is the capital and most populous city of Estonia.",
                              "Estonia borders Latvia to the south."]
    assert r["source"] == "[USR] Which city is the capital of Estonia? [SYS]" and r["target"] == " tallinn"
    assert rows["quasar_t-validation-s3q1002"]["knowledge"] == ["Mercury is the smallest planet in the Solar System."]


def test_wizard_of_wikipedia(tmp_path):
    rep, rows = _run(tmp_path, "wizard_of_wikipedia", FIX / "wizard_of_wikipedia" / "valid_random_split.json")
    assert (rep.rows_in, rep.rows_out, rep.dropped) == (3, 2, {"no checked sentence (no_passages_used)": 1})
    r = rows["wizard_of_wikipedia-validation-00000-00"]
    assert r["knowledge"] == ["i love walking along the coast.",
                              "A lighthouse is a tower designed to emit light to serve as a navigational aid."]
    assert r["source"] == "[SYS]"
    r = rows["wizard_of_wikipedia-validation-00000-04"]
    assert r["knowledge"][1] == "Modern lighthouses are largely automated and maintained remotely."
    # the dropped wizard turn still appears in the history
    assert r["source"] == ("[SYS] Lighthouses are towers that guide ships with a light. "
                           "[USR] I walk past one every weekend! Are they still used? [SYS] Some are, "
                           "though many are automated now. [USR] Who keeps them running? [SYS]")
    assert r["target"] == " Keepers used to, but now most are maintained remotely."


def test_proofwriter_original_layout(tmp_path):
    rep, rows = _run(tmp_path, "proofwriter", FIX / "proofwriter" / "meta-dev.jsonl")
    assert (rep.rows_in, rep.rows_out, rep.dropped) == (3, 3, {})
    q1, q2, q3 = (rows[f"proofwriter-validation-AttNoneg-OWA-D2-17-Q{k}"] for k in (1, 2, 3))
    assert q1["knowledge"] == ["The cat is red. The cat is big. The dog is kind. "
                               "If something is red then it is round. Round things are nice."]
    assert q1["source"] == "[USR] The cat is nice. [SYS]"
    assert [q["target"] for q in (q1, q2, q3)] == [" True", " False", " Unknown"]
    assert [q["label"] for q in (q1, q2, q3)] == [0, 1, 2]
    assert q1["options"] == [" True", " False", " Unknown"]


def test_proofwriter_reformatted_layout(tmp_path):
    rep, rows = _run(tmp_path, "proofwriter", FIX / "proofwriter" / "dev_reformatted.json")
    assert (rep.rows_in, rep.rows_out) == (2, 2)
    r = rows["proofwriter-validation-ProofWriter_AttNoneg-OWA-D5-9_Q2"]
    assert r["source"] == "[USR] Gary is young. [SYS]"  # the "Based on the above information..." prefix is cut
    assert (r["target"], r["label"]) == (" Unknown", 2)
    assert r["knowledge"] == ["Gary is blue. If someone is blue then they are cold."]


def test_folio(tmp_path):
    rep, rows = _run(tmp_path, "folio", FIX / "folio" / "folio-validation.jsonl")
    assert (rep.rows_in, rep.rows_out) == (3, 3)
    r = rows["folio-validation-0000"]
    assert r["knowledge"] == ["All herons are birds.", "No bird is a reptile.", "Pip is a heron."]
    assert r["source"] == "[USR] Pip is a bird. [SYS]" and (r["target"], r["label"]) == (" True", 0)
    # "Uncertain"
    assert (rows["folio-validation-0002"]["target"], rows["folio-validation-0002"]["label"]) == (" Unknown", 2)
    _, rows = _run(tmp_path, "folio", FIX / "folio" / "folio_v2_validation.jsonl", out="v2.parquet")
    assert rows["folio-validation-340"]["knowledge"] == ["All herons are birds.", "Pip is a heron."]


def test_counterfact_rome_layout(tmp_path):
    rep, rows = _run(tmp_path, "counterfact", FIX / "counterfact" / "counterfact.json", "train")
    assert (rep.rows_in, rep.rows_out, rep.dropped) == (2, 1, {"new target equals the true one": 1})
    r = rows["counterfact-train-0"]
    assert r["source"] == "The mother tongue of Ida Lund is"
    assert (r["target"], r["target_true"]) == (" Finnish", " Danish")
    assert r["knowledge"] == ["The mother tongue of Ida Lund is Finnish."]
    assert r["paraphrases"] == ["It rained all week. Ida Lund spoke the language", "Ida Lund, a native speaker of"]
    assert r["neighbours"] == [{"prompt": "The mother tongue of Karl Holm is", "target": " Danish"},
                               {"prompt": "Anders Berg spoke the language", "target": " Danish"}]
    assert r["options"] is None and r["label"] is None


def test_counterfact_stems_layout(tmp_path):
    rep, rows = _run(tmp_path, "counterfact", FIX / "counterfact" / "counterfact_stems.json", "test")
    assert (rep.rows_in, rep.rows_out, rep.dropped) == (3, 2, {"no new target": 1})
    r = rows["counterfact-test-2"]
    assert (r["source"], r["target"], r["target_true"]) == ("The official language of Velmora is", " Latin",
                                                            " Velmoran")
    assert r["knowledge"] == ["The official language of Velmora is Latin."]
    assert r["paraphrases"] is None and r["neighbours"] is None


def test_commonsenseqa(tmp_path):
    rep, rows = _run(tmp_path, "commonsenseqa", FIX / "commonsenseqa" / "dev_rand_split.jsonl")
    assert (rep.rows_in, rep.rows_out, rep.dropped) == (3, 2, {"no answer key": 1})
    r = rows["commonsenseqa-validation-q001"]
    assert r["knowledge"] == []
    assert r["source"] == "[USR] Where would you keep milk cold? [SYS]"
    assert r["options"] == [" oven", " refrigerator", " garden", " attic", " car roof"]
    assert (r["label"], r["target"]) == (1, " refrigerator")
    rep, rows = _run(tmp_path, "commonsenseqa", FIX / "commonsenseqa" / "train_rand_split.jsonl", out="orig.parquet")
    assert rep.split == "train"
    assert (rows["commonsenseqa-train-t001"]["target"], rows["commonsenseqa-train-t001"]["label"]) == (" umbrella", 2)


# --------------------------------------------------------------------------- every converter: determinism, stats

FIXTURE_JOBS = {
    "cmu_dog": ("cmu_dog/Conversations/valid", None),
    "curiosity": (None, None),
    "dream": ("dream/dev.json", None),
    "natural_questions": ("natural_questions/dev.json", None),
    "quasar_t": ("quasar_t/questions/dev_questions.json", None),
    "wizard_of_wikipedia": ("wizard_of_wikipedia/valid_random_split.json", None),
    "proofwriter": ("proofwriter/meta-dev.jsonl", None),
    "folio": ("folio/folio-validation.jsonl", None),
    "counterfact": ("counterfact/counterfact.json", "train"),
    "commonsenseqa": ("commonsenseqa/dev_rand_split.jsonl", None),
}


def test_every_converter_has_a_fixture():
    assert set(FIXTURE_JOBS) == set(CONVERTERS)


@pytest.mark.parametrize("name", sorted(FIXTURE_JOBS))
def test_deterministic(tmp_path, name):
    rel, split = FIXTURE_JOBS[name]
    inp = _curiosity_dir(tmp_path) if name == "curiosity" else FIX / rel
    convert(name, inp, tmp_path / "a.parquet", split)
    convert(name, inp, tmp_path / "b.parquet", split)
    assert (tmp_path / "a.parquet").read_bytes() == (tmp_path / "b.parquet").read_bytes()


def test_stats_and_report_text(tmp_path):
    rep = convert("folio", FIX / "folio" / "folio-validation.jsonl", tmp_path / "f.parquet")
    text = format_report(rep)
    assert "rows in   3" in text and "rows out  3" in text and "knowledge chars" in text
    s = stats(tmp_path / "f.parquet")
    assert s["rows"] == 3
    (g,) = s["groups"]
    assert (g["dataset"], g["split"], g["rows"]) == ("folio", "validation", 3)
    assert g["labels"] == {"False": 1, "True": 1, "Unknown": 1}
    assert g["knowledge_items"] == {"mean": 3.0, "max": 3}
    assert s["fields"]["options"] == 3 and s["fields"]["target_true"] == 0
    assert "folio / validation: 3 rows" in format_stats(s)


# --------------------------------------------------------------------------- splits and errors


def test_split_inference():
    assert infer_split(Path("dream/dev.json")) == "validation"
    assert infer_split(Path("folio-validation.jsonl")) == "validation"
    assert infer_split(Path("dev_rand_split.jsonl")) == "validation"
    assert infer_split(Path("questions/train_questions.json.gz")) == "train"
    assert infer_split(Path("Conversations/valid")) == "validation"
    assert infer_split(Path("counterfact_stems.json")) is None
    assert infer_split(Path("train_dev.json")) is None  # ambiguous


def test_split_option_overrides_and_normalises(tmp_path):
    rep = convert("dream", FIX / "dream" / "dev.json", tmp_path / "d.parquet", "TEST")
    assert rep.split == "test"
    assert read_samples(tmp_path / "d.parquet")["id"][0].as_py() == "dream-test-1-101-0"


def test_split_required_when_name_says_none(tmp_path):
    with pytest.raises(ConvertError, match=r"counterfact_stems\.json.*pass --split"):
        convert("counterfact", FIX / "counterfact" / "counterfact_stems.json", tmp_path / "o.parquet")


def test_unknown_dataset_and_missing_input(tmp_path):
    with pytest.raises(ConvertError, match="unknown dataset 'squad'"):
        convert("squad", FIX / "dream" / "dev.json", tmp_path / "o.parquet")
    with pytest.raises(ConvertError, match="no such file"):
        convert("dream", tmp_path / "nope" / "dev.json", tmp_path / "o.parquet")


def _write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text, encoding="utf-8")
    return p


def test_malformed_jsonl_names_file_and_line(tmp_path):
    good = (FIX / "folio" / "folio-validation.jsonl").read_text().splitlines()
    p = _write(tmp_path, "folio-dev.jsonl", "\n".join([good[0], '{"premises": ["x"], "conclusion": ', good[2]]) + "\n")
    with pytest.raises(SampleError, match=rf"{p.name}: line 2: invalid JSON"):
        convert("folio", p, tmp_path / "o.parquet")


def test_malformed_json_document_names_file_and_line(tmp_path):
    text = (FIX / "dream" / "dev.json").read_text().replace('"answer": "On Mondays."', '"answer": "On Mondays.",,')
    p = _write(tmp_path, "dev.json", text)
    with pytest.raises(SampleError, match=r"dev\.json: line 13 column \d+: invalid JSON"):
        convert("dream", p, tmp_path / "o.parquet")


def test_missing_field_names_file_and_line(tmp_path):
    lines = (FIX / "commonsenseqa" / "dev_rand_split.jsonl").read_text().splitlines()
    rec = json.loads(lines[1])
    del rec["question"]
    p = _write(tmp_path, "dev_rand_split.jsonl", "\n".join([lines[0], json.dumps(rec)]) + "\n")
    with pytest.raises(SampleError, match=r"dev_rand_split\.jsonl: line 2: missing field 'question'"):
        convert("commonsenseqa", p, tmp_path / "o.parquet")


def test_bad_label_names_file_line_and_question(tmp_path):
    text = (FIX / "proofwriter" / "meta-dev.jsonl").read_text().replace('"answer": "Unknown"', '"answer": "Maybe"')
    p = _write(tmp_path, "meta-dev.jsonl", text)
    with pytest.raises(SampleError,
                       match=r"meta-dev\.jsonl: line 1: question Q3: label 'Maybe' is not True / False / Unknown"):
        convert("proofwriter", p, tmp_path / "o.parquet")


def test_malformed_records_in_json_files(tmp_path):
    cf = json.loads((FIX / "counterfact" / "counterfact.json").read_text())
    cf[1]["requested_rewrite"]["prompt"] = "Mount Kela is located in"
    p = _write(tmp_path, "cf.json", json.dumps(cf))
    with pytest.raises(SampleError, match=r"cf\.json: record 1: requested_rewrite: prompt .* has no '\{\}'"):
        convert("counterfact", p, tmp_path / "o.parquet", "train")

    conv = tmp_path / "cmu" / "Conversations" / "valid"
    shutil.copytree(FIX / "cmu_dog", tmp_path / "cmu")
    bad = json.loads((conv / "a1good.json").read_text())
    del bad["history"][1]["docIdx"]
    (conv / "a1good.json").write_text(json.dumps(bad))
    with pytest.raises(SampleError, match=r"a1good\.json: turn 1: missing field 'docIdx'"):
        convert("cmu_dog", conv, tmp_path / "o.parquet")

    wow = json.loads((FIX / "wizard_of_wikipedia" / "valid_random_split.json").read_text())
    del wow[0]["dialog"][2]["speaker"]
    p = _write(tmp_path, "valid_random_split.json", json.dumps(wow))
    with pytest.raises(SampleError, match=r"valid_random_split\.json: dialog 0: turn 2: missing field 'speaker'"):
        convert("wizard_of_wikipedia", p, tmp_path / "o.parquet")


# --------------------------------------------------------------------------- CLI and hub input


def test_cli_convert_and_stats(tmp_path):
    runner = CliRunner()
    out = tmp_path / "dream.parquet"
    res = runner.invoke(app, ["data", "convert", "dream", "--input", str(FIX / "dream" / "dev.json"), "--out",
                              str(out)])
    assert res.exit_code == 0, res.output
    assert "rows in   3" in res.output and "answer not among choices: 1" in res.output
    res = runner.invoke(app, ["data", "stats", str(out)])
    assert res.exit_code == 0 and "dream / validation: 2 rows" in res.output
    res = runner.invoke(app, ["data", "stats", str(out), "--json"])
    assert json.loads(res.output)["groups"][0]["rows"] == 2
    res = runner.invoke(app, ["data", "convert", "counterfact", "--input",
                              str(FIX / "counterfact" / "counterfact_stems.json"), "--out", str(out)])
    assert res.exit_code == 2 and "pass --split" in res.output  # bad input: 2 in every command (kcache/cli/errors.py)


def test_hf_input_goes_through_the_same_converter(tmp_path, monkeypatch):
    import datasets

    rows = [json.loads(line) for line in (FIX / "commonsenseqa" / "dev_rand_split.jsonl").read_text().splitlines()]
    seen = {}

    def fake_load(name, config=None, split=None):
        seen.update(name=name, config=config, split=split)
        return datasets.Dataset.from_list(rows)

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    rep, out = _run(tmp_path, "commonsenseqa", "hf:tau/commonsense_qa", "validation")
    assert seen == {"name": "tau/commonsense_qa", "config": None, "split": "validation"}
    assert (rep.rows_out, out["commonsenseqa-validation-q001"]["target"]) == (2, " refrigerator")
    with pytest.raises(ConvertError, match="hf: input is not supported"):
        convert("dream", "hf:dream", tmp_path / "o.parquet", "validation")


# --------------------------------------------------------------------------- the real raw files

REAL_JOBS = {
    # name: (path under shared/data, --split, rows in, rows out, drops)
    "dream": ("dream/dev.json", None, 2040, 2040, {}),
    "cmu_dog": ("cmu_dog/Conversations/valid", None, 7030, 1923, {"conversation rating < 3": 5107}),
    "folio": ("folio/folio-validation.jsonl", None, 204, 204, {}),
    "proofwriter": ("proofwriter/dev_depth5.json", None, 600, 600, {}),
    "counterfact": ("counterfact/counterfact_stems.json", "train", 21919, 21919, {}),
    "commonsenseqa": ("commonsenseqa/dev_rand_split.jsonl", None, 1221, 1221, {}),
}


@pytest.mark.parametrize("name", sorted(REAL_JOBS))
def test_real_file(tmp_path, name):
    rel, split, n_in, n_out, drops = REAL_JOBS[name]
    path = REAL / rel
    if not path.exists():
        pytest.skip(f"real {name} data not present: {path} (the shared data folder is outside the repository)")
    rep, rows = _run(tmp_path, name, path, split)
    assert (rep.rows_in, rep.rows_out, rep.dropped) == (n_in, n_out, drops)
    assert {r["dataset"] for r in rows.values()} == {name}
    if name == "dream":
        r = rows["dream-validation-14-349-0"]
        assert r["source"] == "[USR] What's the woman probably going to do? [SYS]"
        assert (r["target"], r["label"]) == (" To change her job.", 1)
        assert r["knowledge"][0] == "M: How long have you been teaching in this middle school?"
    elif name == "cmu_dog":
        assert all(json.loads(r["meta"])["rating"] == 3 for r in rows.values())
        assert all(r["source"].endswith("[SYS]") and len(r["knowledge"]) == 1 for r in rows.values())
    elif name == "folio":
        r = rows["folio-validation-0000"]
        assert r["source"] == "[USR] Bonnie performs in school talent shows often. [SYS]"
        assert (r["target"], r["label"]) == (" Unknown", 2)
        assert len(r["knowledge"]) == 6
    elif name == "proofwriter":
        r = rows["proofwriter-validation-ProofWriter_AttNoneg-OWA-D5-1041_Q1"]
        assert r["source"] == "[USR] Charlie is kind. [SYS]" and (r["target"], r["label"]) == (" True", 0)
        assert r["knowledge"][0].startswith("Bob is cold. Bob is quiet.")
    elif name == "counterfact":
        r = rows["counterfact-train-0"]
        assert (r["source"], r["target"], r["target_true"]) == ("The mother tongue of Danielle Darrieux is", " English",
                                                                " French")
        assert r["knowledge"] == ["The mother tongue of Danielle Darrieux is English."]
    elif name == "commonsenseqa":
        r = rows["commonsenseqa-validation-1afa02df02c908a558b4036e80242fac"]
        assert (r["target"], r["label"], len(r["options"])) == (" bank", 0, 5)
        assert r["knowledge"] == []
