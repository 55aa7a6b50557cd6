"""kcache: DIEKÆ knowledge injection for frozen decoders, as a cache-first pipeline."""

__version__ = "0.1.0"

from kcache import shutdown as _shutdown  # noqa: E402

_shutdown.install()  # join zarr's I/O thread and kcache's reader threads before the interpreter exits (no rc 134)
