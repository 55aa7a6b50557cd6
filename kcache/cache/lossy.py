"""Optional lossy storage of delta rows, for caches that travel (docs/storage.md).

Pure numpy functions; nothing here touches zarr or the filesystem, so the extractor (through
:mod:`kcache.cache.writer`), a ``kcache convert`` command and ``kcache bench store`` share one
definition of every option.

Storage options (the ``--storage`` spec):

- ``lossless``    the storage dtype as it is (kcache.cache.format.encode_rows): float16 by default.
- ``bitround:N``  float16 with only the top N of its 10 mantissa bits kept (1 <= N <= 9),
                  rounded to nearest, ties to even. The dropped bits are zero, which is what
                  makes the shuffled bytes compress; the array on disk is still plain float16,
                  so any reader decodes it without knowing it was rounded.
- ``int8``        symmetric int8 with one float32 scale per row (absmax / 127). Two arrays:
                  ``values`` (rows, hidden) int8 and ``scale`` (rows,) float32.

Conventions: rows are input tokens, columns the hidden size; "float32 in, float32 out" at the
block level; errors are reported against the float32 rows that were handed in.
"""

from __future__ import annotations

import json
import math

import numpy as np
import torch

from kcache.cache.format import decode_rows, encode_rows

STORAGE_KINDS = ("lossless", "bitround:N (1<=N<=9)", "int8")

F16_MANTISSA_BITS = 10
_F16_SIGN = np.uint16(0x8000)
_F16_ABS = np.uint16(0x7FFF)
_F16_INF = np.uint16(0x7C00)  # magnitude bits of +inf; anything above is a NaN
_F16_MAX_FINITE = np.uint16(0x7BFF)  # 65504
_F16_QNAN = np.uint16(0x7E00)  # quiet NaN: only the top mantissa bit set, survives any keepbits >= 1

INT8_MAX = 127  # symmetric: -128 is never produced, so negation is exact


# ---------------------------------------------------------------------------------------------
# the spec


def parse_storage(spec: str) -> dict:
    """``"lossless"`` | ``"bitround:N"`` | ``"int8"`` -> a JSON-able dict with key ``"kind"``.

    ``bitround:N`` keeps N of float16's 10 mantissa bits (1 <= N <= 9; 10 would be lossless).
    Anything else is a ValueError naming the bad spec and listing the valid ones.
    """
    valid = f"valid: {', '.join(STORAGE_KINDS)}"
    s = str(spec).strip().lower()
    if s == "lossless":
        return {"kind": "lossless"}
    if s == "int8":
        return {"kind": "int8"}
    if s.startswith("bitround:"):
        n = s.split(":", 1)[1]
        if n.isdigit() and 1 <= int(n) <= F16_MANTISSA_BITS - 1:
            return {"kind": "bitround", "keepbits": int(n)}
        raise ValueError(f"storage {spec!r}: bitround keeps 1 to {F16_MANTISSA_BITS - 1} of float16's "
                         f"{F16_MANTISSA_BITS} mantissa bits; {valid}")
    raise ValueError(f"unknown storage {spec!r}; {valid}")


def storage_spec(storage: dict) -> str:
    """Inverse of ``parse_storage``: the canonical spec string (for attributes and logs)."""
    if storage["kind"] == "bitround":
        return f"bitround:{storage['keepbits']}"
    return storage["kind"]


def bits_per_value(storage: dict, dtype: str = "float16", hidden: int | None = None) -> float:
    """Information bits per stored value before compression (int8 counts its row scale when
    ``hidden`` is given). bitround is still 16 bits on disk; the zeroed bits are what compress."""
    kind = storage["kind"]
    if kind == "int8":
        return 8.0 + (32.0 / hidden if hidden else 0.0)
    if kind == "bitround":
        return 1 + 5 + storage["keepbits"]  # sign + exponent + kept mantissa
    return {"float16": 16.0, "bfloat16": 16.0, "float32": 32.0}[dtype]


# ---------------------------------------------------------------------------------------------
# bit rounding


def bitround_float16(x: np.ndarray, keepbits: int) -> np.ndarray:
    """Round float16 values to ``keepbits`` mantissa bits (round to nearest, ties to even).

    Works on the raw uint16 bits: add half of the dropped range (minus one, plus the lowest kept
    bit for ties-to-even) and zero the dropped bits. A carry out of the mantissa bumps the
    exponent, which is the correctly rounded result because the float16 encoding is monotone in
    its magnitude bits (subnormals included).

    Guarantees:
    - finite stays finite: a value that would round up past 65504 is clamped to the largest
      finite value with ``keepbits`` bits (``0x7BFF`` with the dropped bits zeroed), which is
      the one case where the error exceeds half a kept ulp (it is < one kept ulp);
    - ±inf stays ±inf; every NaN becomes a quiet NaN of the same sign (``0x7E00``, so even a
      NaN's dropped bits are zero and rounding never turns a NaN into inf);
    - ±0 stays ±0 (the sign bit is never touched); the result is idempotent.

    Error bound for every other value: ``|x - r| <= 2**(e - keepbits - 1)`` where ``e`` is the
    unbiased exponent of ``x`` (``-14`` for subnormals).
    """
    x = np.asarray(x)
    if x.dtype != np.float16:
        raise TypeError(f"bitround_float16 needs a float16 array, got {x.dtype}")
    keepbits = int(keepbits)
    if not 1 <= keepbits <= F16_MANTISSA_BITS:
        raise ValueError(f"keepbits must be 1..{F16_MANTISSA_BITS}, got {keepbits}")
    if keepbits == F16_MANTISSA_BITS:
        return x.copy()
    drop = F16_MANTISSA_BITS - keepbits
    mask = np.uint16((0xFFFF << drop) & 0xFFFF)
    b = x.view(np.uint16)
    sign = b & _F16_SIGN
    mag = b & _F16_ABS
    # uint16 arithmetic cannot overflow for finite values: 0x7BFF + 0x1FF + 1 < 0x8000, so a carry
    # out of the mantissa lands in the exponent (never the sign). Non-finite lanes are replaced below.
    half_minus_one = np.uint16((1 << (drop - 1)) - 1)
    lsb = (mag >> np.uint16(drop)) & np.uint16(1)
    r = (mag + half_minus_one + lsb) & mask
    finite = mag < _F16_INF
    # Rounded up into the inf encoding: clamp to the largest finite value that has keepbits bits.
    r[finite & (r >= _F16_INF)] = _F16_MAX_FINITE & mask
    if not finite.all():
        r[~finite] = np.where(mag[~finite] == _F16_INF, _F16_INF, _F16_QNAN)
    r |= sign
    return r.view(np.float16)


# ---------------------------------------------------------------------------------------------
# int8 per row


def quantize_int8_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(n, h) float32 -> (q int8 (n, h), scale float32 (n,)), ``x ≈ q * scale[:, None]``.

    Symmetric per row: ``scale = absmax / 127``, ``q = clip(rint(x / scale), -127, 127)``
    (``np.rint`` rounds half to even). A row of zeros gets scale 0 and q 0. Per element,
    ``|x - q * scale| <= scale / 2`` (up to float32 rounding of the division). Non-finite input
    is a ValueError: one inf would make the whole row's scale meaningless.
    """
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"quantize_int8_rows needs (rows, hidden), got shape {x.shape}")
    absmax = np.abs(x).max(axis=1) if x.shape[1] else np.zeros(x.shape[0], np.float32)
    if not np.isfinite(absmax).all():
        raise ValueError("quantize_int8_rows: non-finite values in the rows")
    scale = (absmax / np.float32(INT8_MAX)).astype(np.float32)
    # Divide only where the row is non-zero; zero rows stay 0 instead of 0/0 = NaN.
    inv = np.divide(np.float32(1), scale, out=np.zeros_like(scale), where=scale > 0)
    q = np.rint(x * inv[:, None])
    # x * (1/scale) can land a hair beyond ±127 at the row's peak; clipping is the exact answer there.
    np.clip(q, -INT8_MAX, INT8_MAX, out=q)
    return q.astype(np.int8), scale


def dequantize_int8_rows(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """(n, h) int8 and (n,) float32 scales -> (n, h) float32 ``q * scale[:, None]``."""
    q = np.asarray(q)
    scale = np.asarray(scale, dtype=np.float32)
    if q.ndim != 2 or scale.shape != (q.shape[0],):
        raise ValueError(f"dequantize_int8_rows: values {q.shape} and scale {scale.shape} do not match")
    return q.astype(np.float32) * scale[:, None]


# ---------------------------------------------------------------------------------------------
# blocks


def encode_block(rows_f32: np.ndarray, storage: dict, dtype: str = "float16") -> dict[str, np.ndarray]:
    """float32 rows (n, hidden) -> the arrays to write: ``{"values": …}`` (+ ``{"scale": …}`` for int8).

    lossless: ``kcache.cache.format.encode_rows(rows, dtype)`` (float16 overflow and NaN/inf are errors).
    bitround: the same float16 encoding, then ``bitround_float16``; only for dtype float16.
    int8: ``quantize_int8_rows``; ``dtype`` is not used (values are int8, scales float32).
    """
    kind = storage["kind"]
    if kind == "int8":
        q, scale = quantize_int8_rows(rows_f32)
        return {"values": q, "scale": scale}
    if kind == "lossless":
        return {"values": encode_rows(torch.from_numpy(np.ascontiguousarray(rows_f32, dtype=np.float32)), dtype)}
    if kind == "bitround":
        if dtype != "float16":
            raise ValueError(f"storage bitround:{storage['keepbits']} rounds float16 mantissas; "
                             f"it cannot be combined with dtype {dtype!r} (use --dtype float16)")
        v = encode_rows(torch.from_numpy(np.ascontiguousarray(rows_f32, dtype=np.float32)), dtype)
        return {"values": bitround_float16(v, storage["keepbits"])}
    raise ValueError(f"unknown storage kind {kind!r}; valid: {', '.join(STORAGE_KINDS)}")


def decode_block(arrays: dict[str, np.ndarray], storage: dict, dtype: str = "float16") -> np.ndarray:
    """Inverse of ``encode_block``: the stored arrays -> float32 rows (n, hidden)."""
    if storage["kind"] == "int8":
        return dequantize_int8_rows(arrays["values"], arrays["scale"])
    return decode_rows(arrays["values"], dtype)


# ---------------------------------------------------------------------------------------------
# error accounting


class ErrorAccumulator:
    """Per-layer storage error, accumulated block by block and resumable from a commit log.

    Sums are float64: ``sse`` = Σ (decoded − reference)², ``ssr`` = Σ reference², ``max_abs``,
    ``n`` = elements seen. ``relative_rmse = sqrt(sse / ssr)`` is the error's norm relative to
    the data's (0 when both are 0; None when the reference is all zeros but the error is not).
    ``state()`` is plain JSON (Python floats round-trip exactly through ``json``), so
    ``ErrorAccumulator(layers, state)`` or ``ErrorAccumulator.from_state(state)`` continues
    exactly where a killed run's last commit left off.
    """

    def __init__(self, layers, state: dict | None = None):
        self.layers = [int(l) for l in layers]
        self.s = {str(l): {"sse": 0.0, "ssr": 0.0, "max_abs": 0.0, "n": 0} for l in self.layers}
        if state:
            loaded = json.loads(json.dumps(state))  # a deep copy, and proof it is JSON
            unknown = set(loaded) - set(self.s)
            if unknown:
                raise ValueError(f"error state has layers {sorted(unknown)} that are not in {self.layers}")
            for l, st in loaded.items():
                self.s[l] = {"sse": float(st["sse"]), "ssr": float(st["ssr"]), "max_abs": float(st["max_abs"]),
                             "n": int(st["n"])}

    @classmethod
    def from_state(cls, state: dict) -> ErrorAccumulator:
        return cls([int(l) for l in state], state)

    def update(self, layer: int, reference_f32: np.ndarray, decoded_f32: np.ndarray) -> None:
        ref_all, dec_all = np.asarray(reference_f32), np.asarray(decoded_f32)
        if ref_all.shape != dec_all.shape:
            raise ValueError(f"layer {layer}: reference {ref_all.shape} and decoded {dec_all.shape} differ in shape")
        st = self.s[str(layer)]
        ref_all = ref_all.reshape(len(ref_all), -1) if ref_all.ndim else ref_all.reshape(1, 1)
        dec_all = dec_all.reshape(ref_all.shape)
        # float64 in slices of rows: exact enough sums without tripling a large block's memory.
        step = max(1, (1 << 20) // max(1, ref_all.shape[1]))
        for a in range(0, len(ref_all), step):
            ref = ref_all[a : a + step].astype(np.float64).ravel()
            err = dec_all[a : a + step].astype(np.float64).ravel() - ref
            if not ref.size:
                continue
            st["sse"] += float(np.dot(err, err))
            st["ssr"] += float(np.dot(ref, ref))
            st["max_abs"] = max(st["max_abs"], float(np.abs(err).max()))
            st["n"] += int(ref.size)

    def state(self) -> dict:
        return json.loads(json.dumps(self.s))

    @staticmethod
    def _summarise(sse: float, ssr: float, max_abs: float) -> dict:
        if ssr > 0:
            rel = math.sqrt(sse / ssr)
        else:
            rel = 0.0 if sse == 0 else None
        return {"relative_rmse": rel, "max_abs_error": max_abs}

    def summary(self) -> dict:
        """``{str(layer): {"relative_rmse": …, "max_abs_error": …}}``."""
        return {l: self._summarise(st["sse"], st["ssr"], st["max_abs"]) for l, st in self.s.items()}

    def overall(self) -> dict:
        """The same two figures over all layers together (sums pooled, not averaged)."""
        v = list(self.s.values())
        return self._summarise(sum(s["sse"] for s in v), sum(s["ssr"] for s in v),
                               max((s["max_abs"] for s in v), default=0.0))
