"""Constants of the compeft on-disk format, named as ``spec/FORMAT.md`` names them.

Everything a reader or writer must agree on lives here: metadata keys, the version, encoding and
stream names, limits and error codes. Other modules import these names; none spells them as
literals. Which streams an encoding has, and what its parameters mean, belongs to that encoding's
codec (``codecs/``).
"""

from __future__ import annotations

# --- identification (spec section 2) ----------------------------------------------------------
FORMAT_NAME = "compeft"
FORMAT_VERSION_MAJOR = 1
FORMAT_VERSION_MINOR = 5
FORMAT_VERSION = f"{FORMAT_VERSION_MAJOR}.{FORMAT_VERSION_MINOR}"
#: The minor version that added recovery artifacts, ``requires`` and ``provenance.training``
#: (spec 3.6). Files of an earlier minor version hold no such members: a reader ignores members of
#: those names there, as unknown members (spec 8.1).
MINOR_RECOVERY = 4
#: What a writer of this version writes for a manifest that uses none of the members of
#: ``MINOR_RECOVERY`` (spec 8.1): such a file is byte for byte what a 1.3 writer wrote.
FORMAT_VERSION_WITHOUT_RECOVERY = f"{FORMAT_VERSION_MAJOR}.{MINOR_RECOVERY - 1}"
#: What a writer writes for a manifest that uses a member of ``MINOR_RECOVERY`` and none of
#: ``MINOR_SOURCE_METADATA``: byte for byte what a 1.4 writer wrote.
FORMAT_VERSION_RECOVERY = f"{FORMAT_VERSION_MAJOR}.{MINOR_RECOVERY}"
#: The minor version that added ``provenance.source_metadata`` (spec 3.5): the ``__metadata__`` of
#: a single-file source (kohya ``ss_*``, ``modelspec.*``), which a single-file output gets back.
MINOR_SOURCE_METADATA = 5

#: The safetensors header member that holds the metadata; no stream can have this name.
SAFETENSORS_METADATA = "__metadata__"

META_FORMAT = "compeft.format"
META_VERSION = "compeft.version"
META_MANIFEST = "compeft.manifest"
META_MANIFEST_SHA256 = "compeft.manifest_sha256"
META_MANIFEST_ENCODING = "compeft.manifest_encoding"

#: How ``compeft.manifest`` holds the manifest's UTF-8 JSON text: as is, or as the standard base64
#: (with padding) of one zstd frame that declares its content size, compressed without or (1.1)
#: with the format's manifest dictionary as a raw-content zstd dictionary.
MANIFEST_JSON = "json"
MANIFEST_ZSTD_BASE64 = "zstd+base64"
MANIFEST_ZSTD_DICT1_BASE64 = "zstd+dict1+base64"
MANIFEST_ENCODINGS = (MANIFEST_JSON, MANIFEST_ZSTD_BASE64, MANIFEST_ZSTD_DICT1_BASE64)
#: The dictionary of ``zstd+dict1+base64``: ``spec/manifest-dictionary-1.txt``, byte for byte
#: (shipped as ``compeft_format/data/manifest-dictionary-1.txt``).
MANIFEST_DICT1_FILE = "manifest-dictionary-1.txt"
MANIFEST_DICT1_SHA256 = "476e603d854736851ab59d01d56f1f80eb48c9cd926040a7dcf13da6283813fd"

#: Features a version-1 reader of this library understands. A file whose manifest lists a feature
#: in ``required_features`` that is not in this set is refused with ``UNSUPPORTED_FEATURE``.
SUPPORTED_FEATURES: frozenset[str] = frozenset()

# --- encodings (spec section 4) ---------------------------------------------------------------
ENC_TERNARY = "ternary"
ENC_SPARSE = "sparse"
ENC_DENSE = "dense"
ENCODINGS = (ENC_TERNARY, ENC_SPARSE, ENC_DENSE)

POSITIONS_BITMAP = "bitmap"
POSITIONS_GOLOMB = "golomb"
POSITION_CODINGS = (POSITIONS_BITMAP, POSITIONS_GOLOMB)

# group parameters (spec 3.3)
PARAM_POSITIONS = "positions"
PARAM_VALUE_DTYPE = "value_dtype"

# stream roles (spec 3.3)
ROLE_POSITIONS = "positions"
ROLE_UNARY = "unary"
ROLE_REMAINDERS = "remainders"
ROLE_EXTRA = "extra"
ROLE_SIGNS = "signs"
ROLE_VALUES = "values"

# stream compression (spec 4.5)
COMP_NONE = "none"
COMP_ZSTD = "zstd"
COMPRESSIONS = (COMP_NONE, COMP_ZSTD)

# --- dtypes (spec section 5) ------------------------------------------------------------------
DTYPE_F32 = "float32"
DTYPE_F16 = "float16"
DTYPE_BF16 = "bfloat16"
FLOAT_DTYPES = (DTYPE_F32, DTYPE_F16, DTYPE_BF16)
DTYPE_ITEMSIZE = {DTYPE_F32: 4, DTYPE_F16: 2, DTYPE_BF16: 2}

# --- manifest vocabularies (spec section 3) ---------------------------------------------------
ADAPTER_KIND_OTHER = "other"
#: (1.4) an artifact of recovery modules (spec 3.6)
ADAPTER_KIND_RECOVERY = "recovery"
ADAPTER_KINDS = ("lora", "ia3", "full", ADAPTER_KIND_OTHER, ADAPTER_KIND_RECOVERY)
#: The factors of a recovery module (spec 3.6): its tensors are ``<module>.recovery_A1.weight``
#: ``[r, in_features]`` and ``<module>.recovery_A2.weight`` ``[out_features, r]``.
RECOVERY_A1 = "recovery_A1"
RECOVERY_A2 = "recovery_A2"
RECOVERY_TENSOR_SUFFIX = ".weight"
#: The activation of a recovery module's bypass: GELU, the erf form (spec 3.6).
ACTIVATION_GELU = "gelu"
RECOVERY_ACTIVATIONS = (ACTIVATION_GELU,)
REPRESENTATION_WEIGHTS = "weights"
REPRESENTATION_DELTA = "delta"
REPRESENTATIONS = (REPRESENTATION_WEIGHTS, REPRESENTATION_DELTA)
REFERENCE_ZERO = "zero"
REFERENCE_ONES = "ones"
REFERENCE_BASE = "base"
REFERENCES = (REFERENCE_ZERO, REFERENCE_ONES, REFERENCE_BASE)
SCOPE_GLOBAL = "global"
SCOPE_TENSOR = "tensor"
SCOPES = (SCOPE_GLOBAL, SCOPE_TENSOR)
MODE_TERNARY = "ternary"
MODE_PRUNE = "prune"
MODES = (MODE_TERNARY, MODE_PRUNE)
BALANCE_NONE = "none"
BALANCE_RANK = "rank"
BALANCES = (BALANCE_NONE, BALANCE_RANK)
SCALE_SIGMA = "sigma"
SCALE_MEAN = "mean"
SCALE_LSQ = "lsq"
SCALE_NORM = "norm"
SCALES = (SCALE_SIGMA, SCALE_MEAN, SCALE_LSQ, SCALE_NORM)
METHOD_COMPEFT = "compeft"
METHOD_NONE = "none"

#: Base-model fingerprint algorithms (spec 3.4): the weights as stored, and (1.2) every floating
#: tensor as binary32, so that copies of one base in different float dtypes agree.
FINGERPRINT_ALGORITHM = "sha256-state-dict-v1"
FINGERPRINT_ALGORITHM_F32 = "sha256-state-dict-f32-v1"
FINGERPRINT_ALGORITHMS = (FINGERPRINT_ALGORITHM, FINGERPRINT_ALGORITHM_F32)

# --- limits a reader enforces (spec section 8) ------------------------------------------------
MAX_HEADER_BYTES = 64 * 1024 * 1024
MAX_MANIFEST_BYTES = 64 * 1024 * 1024
MAX_TENSORS = 1_000_000
MAX_RANK = 8
MAX_ELEMENTS_PER_TENSOR = 1 << 36
MAX_GROUP_ELEMENTS = 1 << 36
MAX_NAME_BYTES = 1024

# --- error codes (spec section 9); each is the code of exactly one class in ``errors`` --------
E_FILE_NOT_FOUND = "FILE_NOT_FOUND"
E_NOT_SAFETENSORS = "NOT_SAFETENSORS"
E_TRUNCATED = "TRUNCATED"
E_NOT_COMPEFT = "NOT_COMPEFT"
E_UNSUPPORTED_VERSION = "UNSUPPORTED_VERSION"
E_UNSUPPORTED_FEATURE = "UNSUPPORTED_FEATURE"
E_MANIFEST_INVALID = "MANIFEST_INVALID"
E_MANIFEST_DIGEST_MISMATCH = "MANIFEST_DIGEST_MISMATCH"
E_MANIFEST_MISMATCH = "MANIFEST_MISMATCH"
E_UNKNOWN_ENCODING = "UNKNOWN_ENCODING"
E_LIMIT_EXCEEDED = "LIMIT_EXCEEDED"
E_STREAM_DIGEST_MISMATCH = "STREAM_DIGEST_MISMATCH"
E_STREAM_CORRUPT = "STREAM_CORRUPT"
E_TENSOR_DIGEST_MISMATCH = "TENSOR_DIGEST_MISMATCH"
E_INVALID_ARGUMENT = "INVALID_ARGUMENT"
E_INVALID_INPUT = "INVALID_INPUT"
E_NON_FINITE_INPUT = "NON_FINITE_INPUT"
E_UNSUPPORTED_DTYPE = "UNSUPPORTED_DTYPE"
E_IO = "IO_ERROR"
E_MODEL_MISMATCH = "MODEL_MISMATCH"
E_CONFIG_MISMATCH = "CONFIG_MISMATCH"
E_BASE_MISMATCH = "BASE_MISMATCH"
E_UNSUPPORTED_ADAPTER = "UNSUPPORTED_ADAPTER"
E_UNSUPPORTED_MODEL = "UNSUPPORTED_MODEL"
E_HUB_REPO_NOT_FOUND = "HUB_REPO_NOT_FOUND"
E_HUB_REVISION_NOT_FOUND = "HUB_REVISION_NOT_FOUND"
E_HUB_ENTRY_NOT_FOUND = "HUB_ENTRY_NOT_FOUND"
E_HUB_NO_INDEX = "HUB_NO_INDEX"
E_HUB_AUTH = "HUB_AUTH"
E_HUB_UNREACHABLE = "HUB_UNREACHABLE"
E_HUB_ERROR = "HUB_ERROR"
E_ARTIFACT_DIGEST_MISMATCH = "ARTIFACT_DIGEST_MISMATCH"
E_SIGNATURE_MISSING = "SIGNATURE_MISSING"
E_SIGNATURE_MALFORMED = "SIGNATURE_MALFORMED"
E_SIGNATURE_INVALID = "SIGNATURE_INVALID"
E_KEY_INVALID = "KEY_INVALID"
E_REQUIREMENT_MISSING = "REQUIREMENT_MISSING"

#: Codes a conforming reader returns for a file (spec section 9.1).
READER_ERROR_CODES = (
    E_FILE_NOT_FOUND,
    E_NOT_SAFETENSORS,
    E_TRUNCATED,
    E_NOT_COMPEFT,
    E_UNSUPPORTED_VERSION,
    E_UNSUPPORTED_FEATURE,
    E_MANIFEST_INVALID,
    E_MANIFEST_DIGEST_MISMATCH,
    E_MANIFEST_MISMATCH,
    E_UNKNOWN_ENCODING,
    E_LIMIT_EXCEEDED,
    E_STREAM_DIGEST_MISMATCH,
    E_STREAM_CORRUPT,
    E_TENSOR_DIGEST_MISMATCH,
)

# --- names other libraries load by themselves ---------------------------------------------------
#: weight files peft, transformers and diffusers load from a folder by name, whatever they hold: a
#: compeft file under one of these names would load as a set of unknown tensors (peft then only
#: warns of missing keys, and the model behaves as its base), so none is written under them
FOREIGN_WEIGHT_NAMES = frozenset({"adapter_model.safetensors", "model.safetensors", "pytorch_lora_weights.safetensors",
                                  "diffusion_pytorch_model.safetensors"})
#: their sharded forms
FOREIGN_SHARD_PATTERN = r"(model|pytorch_model|adapter_model|diffusion_pytorch_model)-\d+-of-\d+\.(safetensors|bin)"

# --- Hub repositories (spec section 12, informative) -------------------------------------------
#: The index file a compeft Hub repository carries (``compeft push`` writes it, ``pull`` checks it).
HUB_INDEX_FILE = "compeft-index.json"
HUB_INDEX_VERSION = 1

# --- detached signatures (spec section 12, informative) ----------------------------------------
#: ``<artifact>.sig`` holds the artifact's signature, beside it on disk and in a repository.
SIGNATURE_SUFFIX = ".sig"
SIGNATURE_FORMAT = "compeft-signature"
SIGNATURE_VERSION = 1
SIGNATURE_ALGORITHM = "ed25519"
#: Largest signature file accepted (bytes); one is under 500.
MAX_SIGNATURE_BYTES = 4096

# --- writer defaults (not normative) ----------------------------------------------------------
DEFAULT_ZSTD_LEVEL = 19
DEFAULT_MAX_GROUP_ELEMENTS = 1 << 26
DEFAULT_MIN_SPARSE_NUMEL = 32
#: the named ComPEFT methods (``CompeftConfig.method``), the default one, and the default density
METHOD_FIT = "fit"
METHOD_PAPER = "paper"
DEFAULT_DENSITY = 0.1
