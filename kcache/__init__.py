"""kcache: DIEKÆ knowledge injection for frozen decoders, as a cache-first pipeline."""

__version__ = "0.1.0"
