"""Knowledge graphs for KnowLA-style injection: Arrow tables, importers, embeddings, entity linking.

- :mod:`kcache.kg.tables` — the KG (entities / relations / triples), its directory and
  fingerprint, embeddings tables and their zero-copy torch view, compatibility checks.
- :mod:`kcache.kg.importers` — OpenKE layout (WN18RR …), WordNet names, word2vec text,
  numpy matrix + names.
- :mod:`kcache.kg.embed` — training embeddings with PyKEEN (optional extra ``kcache[kg]``).
- :mod:`kcache.kg.link` — linking words of sample texts to entities with token spans.
- The ``kcache kg`` commands are in :mod:`kcache.cli.kg`. See docs/kg.md.
"""

from kcache.kg.importers import import_numpy, import_openke, import_word2vec, read_openke
from kcache.kg.link import EntityIndex, link_file, link_texts, read_links, write_links
from kcache.kg.tables import (
    KG,
    KGCompatibilityError,
    KGError,
    check_compatible,
    embedding_info,
    embedding_matrix,
    embeddings_table,
    embeddings_to_numpy,
    embeddings_to_torch,
    read_embeddings,
    write_embeddings,
)

__all__ = [
    "KG",
    "KGCompatibilityError",
    "KGError",
    "EntityIndex",
    "check_compatible",
    "embedding_info",
    "embedding_matrix",
    "embeddings_table",
    "embeddings_to_numpy",
    "embeddings_to_torch",
    "import_numpy",
    "import_openke",
    "import_word2vec",
    "link_file",
    "link_texts",
    "read_embeddings",
    "read_links",
    "read_openke",
    "write_embeddings",
    "write_links",
]
