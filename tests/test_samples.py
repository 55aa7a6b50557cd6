"""Knowledge samples: schema round-trips, every validation error, synth determinism."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kcache.data.samples import (
    SampleError,
    read_samples,
    sample_set_fingerprint,
    samples_from_records,
    to_dataset,
    write_samples,
)
from kcache.data.synth import synth_records, synth_samples


def test_round_trip_parquet_jsonl_datasets(tmp_path):
    table = synth_samples(30, seed=5)
    write_samples(table, tmp_path / "a.parquet")
    write_samples(table, tmp_path / "a.jsonl")
    a = read_samples(tmp_path / "a.parquet")
    b = read_samples(tmp_path / "a.jsonl")
    assert a.equals(table) and b.equals(table)
    ds = to_dataset(table)
    assert len(ds) == 30 and ds[3]["neighbours"] == table.to_pylist()[3]["neighbours"]
    assert read_samples(ds).equals(table)
    assert pq.read_schema(tmp_path / "a.parquet").metadata[b"kcache.schema"] == b"samples"


def test_synth_is_byte_identical_for_a_seed(tmp_path):
    write_samples(synth_samples(200, seed=11), tmp_path / "a.parquet")
    write_samples(synth_samples(200, seed=11), tmp_path / "b.parquet")
    write_samples(synth_samples(200, seed=12), tmp_path / "c.parquet")
    assert (tmp_path / "a.parquet").read_bytes() == (tmp_path / "b.parquet").read_bytes()
    assert (tmp_path / "a.parquet").read_bytes() != (tmp_path / "c.parquet").read_bytes()


def test_synth_content_is_coherent():
    recs = synth_records(100, seed=0)
    assert len({r["id"] for r in recs}) == 100
    for r in recs:
        meta = json.loads(r["meta"])
        # the answer is stated in exactly one knowledge passage, about the right subject
        stating = [k for k in r["knowledge"] if meta["subject"] in k and meta["object"] in k]
        assert len(stating) >= 1
        assert r["target"] == f" {meta['object']}." and r["target_true"] != r["target"]
        assert meta["subject"] in r["source"] and all(meta["subject"] in p for p in r["paraphrases"])
        assert all(meta["subject"] not in n["prompt"] for n in r["neighbours"])
    assert {r["split"] for r in recs} == {"train", "validation", "test"}


def _write_jsonl(path, recs):
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda r: r.pop("source"), r"line 3: field 'source': missing"),
        (lambda r: r.update(source=42), r"line 3: field 'source': expected a string"),
        (lambda r: r.update(source="   "), r"line 3: field 'source': empty source"),
        (lambda r: r.update(knowledge="not a list"), r"line 3: field 'knowledge': expected a list of strings"),
        (lambda r: r.update(label=7, options=[" a"]), r"line 3: field 'label': label 7 is not an index"),
        (lambda r: r.update(neighbours=[{"prompt": 1}]), r"line 3: field 'neighbours'"),
        (lambda r: r.update(bogus=1), r"line 3: field 'bogus': unknown field"),
        (lambda r: r.update(id="synth-0-000000"),
         r"line 3: field 'id': duplicate id 'synth-0-000000' \(first at line 1\)"),
    ],
)
def test_validation_errors_name_file_line_field(tmp_path, mutate, match):
    recs = synth_records(4, seed=0)
    mutate(recs[2])
    path = tmp_path / "bad.jsonl"
    _write_jsonl(path, recs)
    with pytest.raises(SampleError, match=str(path).replace(".", r"\.") + ": " + match):
        read_samples(path)


def test_non_utf8_jsonl(tmp_path):
    path = tmp_path / "bad.jsonl"
    good = json.dumps(synth_records(1)[0]).encode()
    path.write_bytes(good + b"\n" + good.replace(b"synth", b"synt\xff") + b"\n")
    with pytest.raises(SampleError, match=r"bad\.jsonl: line 2: not valid UTF-8"):
        read_samples(path)


def test_non_utf8_parquet_binary_column(tmp_path):
    recs = synth_records(3)
    table = samples_from_records(recs)
    src = pa.array([s.encode() for s in table["source"].to_pylist()[:2]] + [b"\xff\xfe bad"], pa.binary())
    table = table.set_column(table.column_names.index("source"), "source", src)
    pq.write_table(table, tmp_path / "bad.parquet")
    with pytest.raises(SampleError, match=r"bad\.parquet: row 2: field 'source': not valid UTF-8"):
        read_samples(tmp_path / "bad.parquet")


def test_invalid_json_and_unknown_format(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text('{"id": "a"}\n')
    with pytest.raises(SampleError, match=r"line 1: field 'dataset': missing"):
        read_samples(p)
    p.write_text(json.dumps(synth_records(1)[0]) + "\n{not json\n")
    with pytest.raises(SampleError, match=r"x\.jsonl: line 2: invalid JSON"):
        read_samples(p)
    (tmp_path / "x.csv").write_text("a")
    with pytest.raises(SampleError, match="unknown samples format"):
        read_samples(tmp_path / "x.csv")


def test_write_is_atomic_and_validates(tmp_path):
    path = tmp_path / "s.parquet"
    write_samples(synth_samples(5), path)
    before = path.read_bytes()
    bad = synth_records(5)
    bad[1]["source"] = ""
    with pytest.raises(SampleError):
        write_samples(bad, path)
    assert path.read_bytes() == before  # nothing already written is lost


def test_sample_set_fingerprint_changes_with_content():
    a = synth_samples(10, seed=1)
    recs = a.to_pylist()
    recs[4]["target"] = " other."
    assert sample_set_fingerprint(a) == sample_set_fingerprint(synth_samples(10, seed=1))
    assert sample_set_fingerprint(a) != sample_set_fingerprint(samples_from_records(recs))
