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

from . import constants, errors
from ._version import __version__
from .apply import MergedAdapter, base_fingerprint, load_adapter, merge_adapter
from .compress import alpha_search, compress, kept_count, rescale, top_k_indices
from .compressed import CompressedAdapter, CompressedTensor
from .container import CompeftFile, load, open_file, save, verify
from .errors import *  # noqa: F403  (the typed errors are part of the public API)
from .hub import PullResult, PushResult, pull, push
from .integrity import state_dict_fingerprint, tensor_sha256
from .manifest import Manifest
from .peft_io import compress_peft, decompress_to_peft, read_source, write_peft_folder
from .report import inspect, ternary_bound_bits

__all__ = [
    "__version__",
    "constants",
    "compress",
    "compress_peft",
    "decompress_to_peft",
    "load_adapter",
    "push",
    "pull",
    "PushResult",
    "PullResult",
    "merge_adapter",
    "MergedAdapter",
    "base_fingerprint",
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
] + errors.__all__
