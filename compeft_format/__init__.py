"""compeft: small, verifiable files for fine-tuned adapters.

ComPEFT compression (top-k sparsification plus ternary quantisation of task vectors) and a
versioned safetensors-based format (``spec/FORMAT.md``) with integrity checks.

Example:
    >>> import compeft_format as cf
    >>> ca = cf.compress(state_dict, density=0.1, alpha=1.0)
    >>> cf.save(ca, "adapter.cpeft.safetensors")
    >>> cf.verify("adapter.cpeft.safetensors")
    >>> tensors = cf.load("adapter.cpeft.safetensors", dtype="float16")
"""

from . import constants
from ._version import __version__
from .compress import alpha_search, compress, kept_count, rescale, top_k_indices
from .compressed import CompressedAdapter, CompressedTensor
from .container import CompeftFile, load, open_file, save, verify
from .errors import (
    CompeftError,
    EncodingError,
    FileNotFound,
    FormatError,
    InputError,
    IntegrityError,
    InvalidArgument,
    IOFailure,
    LimitExceeded,
    ManifestDigestMismatch,
    ManifestError,
    ManifestMismatch,
    NonFiniteInput,
    NotCompeft,
    NotSafetensors,
    StreamCorrupt,
    StreamDigestMismatch,
    TensorDigestMismatch,
    TruncatedFile,
    UnknownEncoding,
    UnsupportedDtype,
    UnsupportedFeature,
    VersionError,
)
from .integrity import state_dict_fingerprint, tensor_sha256
from .manifest import Manifest
from .peft_io import read_source, write_peft_folder
from .report import inspect, ternary_bound_bits


def compress_peft(src, *, density: float = 0.1, alpha: float = 1.0, **kwargs) -> CompressedAdapter:
    """Compress a PEFT adapter folder (or a .safetensors state dict) with the reference and
    metadata its ``adapter_config.json`` implies. Other keyword arguments go to ``compress``."""
    from pathlib import Path

    from .peft_io import kind_and_reference

    sd, config = read_source(src)
    kind, ref = kind_and_reference(config)
    if "reference" not in kwargs:
        if config is not None and ref is None:
            raise InvalidArgument(f"peft_type {config.get('peft_type')!r} has no default reference; pass reference=")
        kwargs["reference"] = ref or constants.REFERENCE_ZERO
    kwargs.setdefault("adapter_kind", kind)
    kwargs.setdefault("peft_config", config)
    kwargs.setdefault("base_model_id", (config or {}).get("base_model_name_or_path"))
    kwargs.setdefault("base_model_revision", (config or {}).get("revision"))
    kwargs.setdefault("source", Path(src).name)
    return compress(sd, density=density, alpha=alpha, **kwargs)


def decompress_to_peft(src, out_dir, *, dtype=None):
    """Verify a compeft file and write it out as a PEFT adapter folder. Returns the paths written."""
    with CompeftFile(src) as f:
        f.verify()
        sd = f.state_dict(dtype=dtype)
        return write_peft_folder(out_dir, sd, f.manifest.adapter.peft_config)


__all__ = [
    "__version__",
    "constants",
    "compress",
    "compress_peft",
    "decompress_to_peft",
    "alpha_search",
    "rescale",
    "kept_count",
    "top_k_indices",
    "CompressedAdapter",
    "CompressedTensor",
    "CompeftFile",
    "Manifest",
    "open_file",
    "save",
    "load",
    "verify",
    "inspect",
    "ternary_bound_bits",
    "tensor_sha256",
    "state_dict_fingerprint",
    "read_source",
    "write_peft_folder",
    "CompeftError",
    "InputError",
    "FileNotFound",
    "InvalidArgument",
    "NonFiniteInput",
    "UnsupportedDtype",
    "FormatError",
    "NotSafetensors",
    "TruncatedFile",
    "NotCompeft",
    "ManifestError",
    "ManifestMismatch",
    "VersionError",
    "UnsupportedFeature",
    "EncodingError",
    "UnknownEncoding",
    "StreamCorrupt",
    "LimitExceeded",
    "IntegrityError",
    "ManifestDigestMismatch",
    "StreamDigestMismatch",
    "TensorDigestMismatch",
    "IOFailure",
]
