"""Train KG embeddings with PyKEEN (the optional extra ``kcache[kg]``).

kcache does not implement TransE & co. itself: :func:`train_embeddings` hands the KG's *train*
triples, with kcache's own entity and relation ids, to a PyKEEN model and training loop (sLCWA,
Adam) and stores the learnt entity representations as an embeddings table tagged with the KG
fingerprint. Any model name PyKEEN's ``model_resolver`` knows works (``transe``, ``rotate``,
``rescal``, ``distmult``, ``complex`` …). Complex-valued representations (RotatE, ComplEx) are
stored as real and imaginary parts interleaved, so the stored width is twice ``dim``.
"""

from __future__ import annotations

import importlib.util
import warnings

import pyarrow as pa

from kcache.kg.tables import KG, KGError, embeddings_table

EXTRA_HINT = "pip install 'kcache[kg]'   (or: pip install pykeen)"


class MissingExtraError(KGError):
    """An optional dependency is not installed; the message names the extra."""


def pykeen_available() -> bool:
    return importlib.util.find_spec("pykeen") is not None


def _require_pykeen():
    if not pykeen_available():
        raise MissingExtraError(
            "kcache kg embed trains embeddings with PyKEEN, which is not installed. Install the optional extra:\n"
            f"    {EXTRA_HINT}\n"
            "(about 25 pure-Python/CPU packages, ~250 MB with scipy and scikit-learn; it reuses the installed torch)"
        )
    import pykeen  # noqa: F401


def train_embeddings(
    kg: KG,
    model: str = "transe",
    dim: int = 100,
    epochs: int = 100,
    *,
    batch_size: int = 1024,
    lr: float = 0.01,
    num_negs: int = 1,
    seed: int = 0,
    device: str = "cpu",
    progress: bool = False,
) -> pa.Table:
    """Train ``model`` on the KG's train triples and return the entity embeddings table.

    Deterministic for a given seed on CPU (PyKEEN seeds torch, numpy and random); the table's
    metadata records the library version and every training parameter (no timings, so two runs
    with the same seed write the same file).
    """
    _require_pykeen()
    import torch
    from pykeen.models import model_resolver
    from pykeen.training import SLCWATrainingLoop
    from pykeen.triples import TriplesFactory
    from pykeen.utils import set_random_seed

    if dim < 1 or epochs < 1:
        raise KGError(f"dim and epochs must be positive (got dim={dim}, epochs={epochs})")
    triples = kg.train_triples()
    if len(triples) == 0:
        raise KGError(f"KG {kg.name} has no train triples; embeddings need a graph (entity-only KGs "
                      "come with their vectors)")
    try:
        model_cls = model_resolver.lookup(model)
    except (KeyError, ValueError) as e:
        raise KGError(f"unknown PyKEEN model {model!r}: {e}") from None
    set_random_seed(seed)
    factory = TriplesFactory(
        mapped_triples=torch.as_tensor(triples, dtype=torch.long),
        entity_to_id={k: i for i, k in enumerate(kg.entities["key"].to_pylist())},
        relation_to_id={k: i for i, k in enumerate(kg.relations["key"].to_pylist())},
        num_entities=kg.num_entities,
        num_relations=kg.num_relations,
    )
    m = model_resolver.make(model_cls, triples_factory=factory, embedding_dim=dim, random_seed=seed).to(device)
    loop = SLCWATrainingLoop(
        model=m,
        triples_factory=factory,
        optimizer="adam",
        optimizer_kwargs={"lr": lr},
        negative_sampler_kwargs={"num_negs_per_pos": num_negs},
    )
    with warnings.catch_warnings():  # PyKEEN/torch chatter that says nothing to a kcache user
        warnings.filterwarnings("ignore", message="Training instances are always shuffled")
        warnings.filterwarnings("ignore", message=".*pin_memory.*")
        losses = loop.train(triples_factory=factory, num_epochs=epochs, batch_size=batch_size, use_tqdm=progress,
                            use_tqdm_batch=False, pin_memory=device != "cpu")
    m.eval()
    with torch.no_grad():
        vectors = m.entity_representations[0](indices=None).detach().cpu()
    import pykeen

    params = {
        "library": f"pykeen {pykeen.get_version()}",
        "model_dim": dim,
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "num_negs": num_negs,
        "seed": seed,
        "train_triples": int(len(triples)),
        "final_loss": float(losses[-1]) if losses else None,
        "complex": bool(vectors.is_complex()),
    }
    return embeddings_table(vectors, kg=kg, model=model_cls.__name__, source="pykeen", params=params)
