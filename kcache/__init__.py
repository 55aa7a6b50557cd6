"""kcache: DIEKÆ knowledge injection for frozen decoders, as a cache-first pipeline."""

__version__ = "0.1.0"

from kcache import shutdown as _shutdown  # noqa: E402

_shutdown.install()  # join zarr's I/O thread and kcache's reader threads before the interpreter exits (no rc 134)

# The public API, imported on first use so that `import kcache` (and the CLI's start) stays light.
# The stage functions named like their modules (extract, finetune, edit, evaluate) are not here:
# importing the submodule rebinds that package attribute to the module, so `kcache.extract` would
# change meaning; they are `from kcache.extract import extract` etc.
_PUBLIC = {
    "load_decoder": "kcache.models",
    "Decoder": "kcache.models",
    "ExtractConfig": "kcache.extract",
    "Cache": "kcache.cache",
    "CacheError": "kcache.cache",
    "fit_encoders": "kcache.fit",
    "FitConfig": "kcache.fit",
    "FinetuneConfig": "kcache.finetune",
    "EditConfig": "kcache.edit",
    "Injector": "kcache.inject",
    "run_pipeline": "kcache.pipeline",
    "load_pipeline": "kcache.pipeline",
    "KCacheError": "kcache.errors",
}
__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str):
    if name in _PUBLIC:
        import importlib

        value = getattr(importlib.import_module(_PUBLIC[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'kcache' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_PUBLIC))
