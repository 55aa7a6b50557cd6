"""Methods beside DIEKÆ, compared with it on the same samples (docs/methods.md).

* :mod:`kcache.methods.baselines` - LoRA, KaSA and SFT baselines that learn to use knowledge given
  in context (``D(K,x) -> target``), the shared training loop, multiple-choice accuracy.
* :mod:`kcache.methods.knowla` - KnowLA, a knowledgeable adaptation layer over KG entity links.
* :mod:`kcache.methods.scoring` - trained baselines scored through :mod:`kcache.evaluate` next to
  DIEKÆ (one evaluate method per baseline directory).

The commands (``train-baseline``, ``eval-choice``, ``evaluate-baselines``, ``knowla``) are in
``kcache/cli/methods.py``.
"""
