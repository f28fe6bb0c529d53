"""compeft: small, verifiable files for fine-tuned adapters.

ComPEFT compression (top-k sparsification plus ternary quantisation of task vectors) and a
versioned safetensors-based format (``spec/FORMAT.md``) with integrity checks and a binding to
the exact base model an adapter was made for.

Example:
    >>> import compeft_format as cf
    >>> ca = cf.compress(state_dict, density=0.1, alpha=1.0)
    >>> cf.save(ca, "adapter.cpeft.safetensors")
    >>> cf.verify("adapter.cpeft.safetensors")
    >>> tensors = cf.load("adapter.cpeft.safetensors", dtype="float16")
    >>> ca = cf.read("adapter.cpeft.safetensors")     # the compressed form back, as save wrote it
    >>> cf.signing.sign("adapter.cpeft.safetensors", "me.key")  # writes adapter.cpeft.safetensors.sig

Recovery modules (CPET / CA-LoRA) and an adapter that requires them (spec 3.6):

    >>> handle = cf.recovery.add_recovery(model, cf.recovery.RecoveryConfig(r=16, target_modules=("q_proj",)))
    >>> cf.save(cf.compress(handle.state_dict(), recovery=handle.config, base=binding), "recovery.cpeft.safetensors")
    >>> cf.save(cf.compress(peft_model, base=binding, training={"steps": 1000},
    ...                     requires=[cf.requirements.requirement("recovery.cpeft.safetensors")]), "task.cpeft.safetensors")
    >>> model = cf.load_adapter(base_model, "task.cpeft.safetensors")  # the recovery artifact first
    >>> cf.recovery.get_recovery(model).remove()                        # the recovery modules out again
"""

from typing import TYPE_CHECKING

from . import constants, errors, lazy
from ._version import __version__
from .errors import *  # noqa: F403  (the typed errors are part of the public API)

# Everything else is imported when first used (PEP 562), so that ``compeft --help`` and the
# commands that need no tensors start without importing torch.
_SUBMODULES = ("batch", "binding", "calibrate", "codecs", "device_decode", "merge", "peft_layout", "recovery",
               "requirements", "signing")
_NAMES = {
    "apply": ("MergedAdapter", "load_adapter", "merge_adapter"),
    "binding": ("BaseBinding", "Fingerprint", "ModelRef", "fingerprint"),
    "budget": ("Budget",),
    "compress": ("CompeftConfig", "alpha_search", "compress", "kept_count", "rescale", "top_k_indices"),
    "compressed": ("CompressedAdapter", "CompressedTensor"),
    "delta": ("apply_delta",),
    "fidelity": ("Fidelity", "ModuleFidelity", "measure_fidelity"),
    "hub": ("Index", "IndexEntry", "PullResult", "PushResult", "pull", "push"),
    "integrity": ("tensor_sha256",),
    "manifest": ("Manifest", "Requirement", "TensorDescription", "TensorInfo"),
    "peft_io": ("compress_peft", "decompress_to_peft", "read_source", "write_peft_folder"),
    "reader": ("CompeftFile", "load", "load_many", "open_file", "read", "verify"),
    "report": ("inspect", "ternary_bound_bits"),
    "writer": ("WriterOptions", "save"),
}
if TYPE_CHECKING:
    from . import batch, binding, calibrate, codecs, device_decode, merge, peft_layout, recovery, requirements, signing
    from .apply import MergedAdapter, load_adapter, merge_adapter
    from .binding import BaseBinding, Fingerprint, ModelRef, fingerprint
    from .budget import Budget
    from .compress import CompeftConfig, alpha_search, compress, kept_count, rescale, top_k_indices
    from .compressed import CompressedAdapter, CompressedTensor
    from .delta import apply_delta
    from .fidelity import Fidelity, ModuleFidelity, measure_fidelity
    from .hub import Index, IndexEntry, PullResult, PushResult, pull, push
    from .integrity import tensor_sha256
    from .manifest import Manifest, Requirement, TensorDescription, TensorInfo
    from .peft_io import compress_peft, decompress_to_peft, read_source, write_peft_folder
    from .reader import CompeftFile, load, load_many, open_file, read, verify
    from .report import inspect, ternary_bound_bits
    from .writer import WriterOptions, save

__all__ = [
    "Budget",
    "__version__",
    "batch",
    "binding",
    "calibrate",
    "device_decode",
    "merge",
    "codecs",
    "constants",
    "errors",
    "peft_layout",
    "recovery",
    "requirements",
    "signing",
    # compress and write
    "CompeftConfig",
    "compress",
    "compress_peft",
    "alpha_search",
    "rescale",
    "kept_count",
    "top_k_indices",
    "Fidelity",
    "ModuleFidelity",
    "measure_fidelity",
    "CompressedAdapter",
    "CompressedTensor",
    "WriterOptions",
    "save",
    # read
    "CompeftFile",
    "open_file",
    "read",
    "load",
    "load_many",
    "verify",
    "inspect",
    "Manifest",
    "TensorDescription",
    "TensorInfo",
    "ternary_bound_bits",
    "tensor_sha256",
    # base models
    "BaseBinding",
    "ModelRef",
    "Fingerprint",
    "fingerprint",
    # models and PEFT folders
    "load_adapter",
    "merge_adapter",
    "MergedAdapter",
    "Requirement",
    "decompress_to_peft",
    "apply_delta",
    "read_source",
    "write_peft_folder",
    # the Hub
    "push",
    "pull",
    "PushResult",
    "PullResult",
    "Index",
    "IndexEntry",
] + errors.__all__

lazy.install(__name__, _NAMES, submodules=_SUBMODULES, functions=("compress",))
