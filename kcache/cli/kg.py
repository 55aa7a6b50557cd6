"""``kcache kg ...``: thin layers over :mod:`kcache.kg` (import, embed, link, stats)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer

from kcache.cli.errors import errors

HELP = "Knowledge graphs as Arrow tables: import, embed, link entities."


def _run(fn):
    with errors():  # the one CLI error handler: same line and exit code as every command
        return fn()


def _summary(kg, out) -> str:
    splits = ", ".join(f"{k} {v}" for k, v in kg.split_counts().items())
    return (f"wrote KG {kg.name} to {out}: {kg.num_entities} entities, {kg.num_relations} relations, "
            f"{kg.num_triples} triples") + (f" ({splits})" if splits else "") + f"\nfingerprint {kg.fingerprint}"


def import_openke_cmd(
    directory: Path = typer.Argument(...,
                                     help="OpenKE benchmark folder (entity2id.txt, relation2id.txt, train2id.txt [, "
                                          "valid2id.txt, test2id.txt])"),
    out: Path = typer.Option(..., "--out", help="KG directory to write"),
    names: Path | None = typer.Option(None, "--names",
                                      help="entity names TSV (default: entity_names.tsv in DIRECTORY when present)"),
    no_names: bool = typer.Option(False, "--no-names", help="name entities by their key"),
    name: str | None = typer.Option(None, "--name", help="KG name (default: the folder name)"),
    vectors: Path | None = typer.Option(None, "--vectors", help=".npy matrix (entities x dim), row i = entity i"),
    vectors_model: str | None = typer.Option(None, "--vectors-model",
                                             help="model that produced --vectors (transe, rotate, …)"),
):
    """Import an OpenKE-layout KG (e.g. WN18RR) into a KG directory."""
    from kcache.kg.importers import import_openke

    kg = _run(lambda: import_openke(directory, out, names=None if no_names else (names or "auto"), name=name,
                                    vectors=vectors, vectors_model=vectors_model))
    typer.echo(_summary(kg, out))


def import_word2vec_cmd(
    path: Path = typer.Argument(..., help="word2vec text file: [count dim] header, then 'token v1 … vd' lines"),
    out: Path = typer.Option(..., "--out", help="KG directory to write, or with --kg the embeddings .parquet file"),
    model: str = typer.Option(..., "--model", help="embedding model that produced the vectors (transe, …)"),
    kg: Path | None = typer.Option(None, "--kg",
                                   help="attach the vectors to this KG (tokens = entity keys) "
                                        "instead of creating a KG"),
    name: str | None = typer.Option(None, "--name", help="KG name (default: the file stem)"),
):
    """Import word2vec-format vectors (e.g. KnowLA's WordNet vectors)."""
    from kcache.kg.importers import import_word2vec

    graph, emb, unmatched = _run(lambda: import_word2vec(path, out, model=model, name=name, kg_dir=kg))
    if kg is not None:
        typer.echo(f"wrote {emb.num_rows} vectors of KG {graph.name} to {out} ({unmatched} "
                   "tokens matched no entity key)")
    else:
        typer.echo(_summary(graph, out))


def import_numpy_cmd(
    vectors: Path = typer.Argument(..., help=".npy matrix (entities x dim), e.g. KnowLA's ConceptNet ent.npy"),
    names: Path = typer.Argument(..., help="names file, line i names row i (e.g. concept.txt)"),
    out: Path = typer.Option(..., "--out", help="KG directory to write"),
    model: str = typer.Option(..., "--model", help="embedding model that produced the vectors (transe, …)"),
    name: str | None = typer.Option(None, "--name", help="KG name (default: the names file stem)"),
):
    """Import a numpy matrix + names file as an entity-only KG with its vectors."""
    from kcache.kg.importers import import_numpy

    kg, _ = _run(lambda: import_numpy(vectors, names, out, model=model, name=name))
    typer.echo(_summary(kg, out))


def embed_cmd(
    kg_dir: Path = typer.Option(..., "--kg", help="KG directory"),
    model: str = typer.Option("transe", "--model", help="PyKEEN model: transe, rotate, rescal, distmult, complex, …"),
    dim: int = typer.Option(100, "--dim", help="embedding dimension (complex models store 2 x dim floats)"),
    epochs: int = typer.Option(100, "--epochs"),
    out: Path = typer.Option(..., "--out", help="embeddings file (.parquet, or .arrow for a memory-mappable file)"),
    batch_size: int = typer.Option(1024, "--batch-size"),
    lr: float = typer.Option(0.01, "--lr"),
    seed: int = typer.Option(0, "--seed"),
    device: str = typer.Option("cpu", "--device"),
):
    """Train entity embeddings on the KG's train triples with PyKEEN (extra: kcache[kg])."""
    from kcache.kg.embed import train_embeddings
    from kcache.kg.tables import KG, write_embeddings

    def go():
        kg = KG.load(kg_dir)
        t0 = time.perf_counter()
        emb = train_embeddings(kg, model, dim, epochs, batch_size=batch_size, lr=lr, seed=seed, device=device)
        write_embeddings(emb, out, kg=kg)
        return kg, emb, time.perf_counter() - t0

    kg, emb, seconds = _run(go)
    from kcache.kg.tables import embedding_info

    info = embedding_info(emb)
    typer.echo(f"wrote {info['model']} embeddings ({emb.num_rows} x {info['dim']}) of KG {kg.name} to {out} in "
               f"{seconds:.1f} s (final loss {info['params']['final_loss']:.4f})")


def link_cmd(
    samples: Path = typer.Option(..., "--samples",
                                 help="samples .parquet/.jsonl, or any JSON lines/Parquet with --text-field"),
    kg_dir: Path = typer.Option(..., "--kg", help="KG directory"),
    tokenizer: str = typer.Option("smollm2-135m", "--tokenizer",
                                  help="model whose tokenizer gives the token spans (spec as for load_decoder)"),
    out: Path = typer.Option(..., "--out", help="links .parquet"),
    k: int = typer.Option(5, "--k", help="candidates per word (padded with -1)"),
    text_field: str = typer.Option("source", "--text-field",
                                   help="field to link: 'source' reads a samples file; other names (dotted for "
                                        "nesting) read plain rows"),
    id_field: str = typer.Option("id", "--id-field"),
    order: str = typer.Option("degree", "--order", help="candidate order: degree (most connected first) or entity_id"),
    max_ngram: int = typer.Option(1, "--max-ngram", help="also link multi-word names of up to N words"),
    no_morph: bool = typer.Option(False, "--no-morph", help="exact and lower-case matches only"),
    add_special_tokens: bool = typer.Option(False, "--add-special-tokens",
                                            help="count token indices with the tokenizer's special tokens (e.g. BOS)"),
    keep_unlinked: bool = typer.Option(False, "--keep-unlinked",
                                       help="also write content words without a match (rule 'none')"),
):
    """Link words of the texts to KG entities (char + token spans, top-k candidate ids)."""
    from kcache.kg.link import link_file

    _, stats = _run(
        lambda: link_file(
            samples, kg_dir, tokenizer, out, text_field=text_field, id_field=id_field, k=k, order=order,
            max_ngram=max_ngram, morph=not no_morph, add_special_tokens=add_special_tokens, keep_unlinked=keep_unlinked,
        )
    )
    rules = ", ".join(f"{r} {n}" for r, n in stats["by_rule"].items())
    typer.echo(
        f"linked {stats['linked_content_words']} of {stats['content_words']} content words "
        f"({100 * stats['link_rate']:.1f}%) in {stats['samples']} texts; {stats['links']} links ({rules}); wrote {out}"
    )


def stats_cmd(
    kg_dir: Path = typer.Argument(..., help="KG directory (or a links / embeddings .parquet file)"),
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
):
    """Counts, fingerprint, relation histogram, degrees and embeddings of a KG (or a links/embeddings file)."""
    from kcache.kg.tables import KG, KGError, _meta, embedding_info, read_embeddings, read_table_file

    def go() -> dict:
        if kg_dir.is_file():
            table = read_table_file(kg_dir, "table")
            kind = _meta(table).get("kcache.schema")
            if kind == "kg-embeddings":
                return {"embeddings": embedding_info(read_embeddings(kg_dir))}
            if kind == "kg-links":
                from kcache.kg.link import link_stats, read_links

                t = read_links(kg_dir)
                meta = _meta(t)
                return {"links": {"rows": t.num_rows, "kg_fingerprint": meta.get("kcache.kg.fingerprint"),
                                  "tokenizer": meta.get("kcache.link.tokenizer"), **link_stats(t)}}
            raise KGError(f"{kg_dir}: neither a kcache embeddings nor a links file (schema {kind})")
        kg = KG.load(kg_dir)
        import numpy as np
        import pyarrow.compute as pc

        rel_counts = {d["values"]: d["counts"] for d in pc.value_counts(kg.triples["relation"]).to_pylist()}
        names = kg.relations["key"].to_pylist()
        deg = kg.degrees()
        out = {
            "name": kg.name,
            "fingerprint": kg.fingerprint,
            "entities": kg.num_entities,
            "relations": kg.num_relations,
            "triples": kg.num_triples,
            "splits": kg.split_counts(),
            "relation_counts": {names[r]: rel_counts.get(r, 0) for r in range(kg.num_relations)},
            "degree": {"mean": round(float(deg.mean()), 3) if len(deg) else 0.0,
                       "max": int(deg.max()) if len(deg) else 0, "isolated": int((deg == 0).sum())},
            "aliases": int(np.asarray(pc.list_value_length(kg.entities["aliases"])).sum()),
            "embeddings": [],
        }
        for p in kg.embedding_files:
            info = embedding_info(read_embeddings(p, kg=kg))
            out["embeddings"].append({"file": str(Path(p).relative_to(kg_dir)), "model": info["model"],
                                      "dim": info["dim"], "rows": info["rows"]})
        return out

    info = _run(go)
    if as_json:
        typer.echo(json.dumps(info, indent=2, sort_keys=True))
        return
    for key, value in info.items():
        typer.echo(f"{key}: {json.dumps(value) if isinstance(value, (dict, list)) else value}")
