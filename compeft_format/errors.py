"""Typed errors. Every error carries a stable ``code`` from ``spec/FORMAT.md`` section 9.

Callers catch by kind (``IntegrityError``), by base class (``CompeftError``) or by the builtin
exception the kind mixes in, as ``huggingface_hub`` does: ``InvalidArgument`` is a ``ValueError``,
``FileNotFound`` a ``FileNotFoundError``, ``IOFailure`` an ``OSError``, ``HubUnreachable`` a
``ConnectionError``. Errors carry the data they are about as attributes (``expected``, ``actual``,
``path``, ``repo_id``, ...), not only in the message. The CLI prints ``<code>: <message>`` on one
line.

Each code of ``constants`` belongs to exactly one class (``CODES`` maps it back); the kinds that
group several codes (``FormatError``, ``IntegrityError``, ...) have no code of their own and are
never raised as such.
"""

from __future__ import annotations

from typing import Any, ClassVar

from . import constants as C

#: code -> the one class that carries it
CODES: dict[str, type[CompeftError]] = {}


class CompeftError(Exception):
    """Base class of every error this library raises on purpose.

    Keyword arguments name the data the error is about; each must be an attribute the class
    declares (``TypeError`` otherwise), so that callers can rely on them.
    """

    code: ClassVar[str] = "COMPEFT_ERROR"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "code" in cls.__dict__:
            owner = CODES.setdefault(cls.code, cls)
            if owner is not cls:
                raise TypeError(f"code {cls.code} belongs to {owner.__name__} already")

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        for key, value in details.items():
            if key.startswith("_") or not hasattr(type(self), key):
                raise TypeError(f"{type(self).__name__} has no detail {key!r}")
            setattr(self, key, value)

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""

    def __str__(self) -> str:  # one line, always
        return " ".join(self.message.split())

    def __reduce__(self) -> tuple[Any, ...]:  # picklable across processes, details included
        details = {k: v for k, v in self.__dict__.items() if not k.startswith("_")}
        return _rebuild, (type(self), self.message, details)


def _rebuild(cls: type[CompeftError], message: str, details: dict[str, Any]) -> CompeftError:
    return cls(message, **details)


# --- the caller's input -------------------------------------------------------------------------
class InputError(CompeftError):
    """The caller's input cannot be used: a folder where a file is expected, an unreadable or
    already-compressed source, a tensor name not in the file. The builtin exception each subclass
    also is fits its own case (a missing file is no ``ValueError``)."""

    code = C.E_INVALID_INPUT
    path: str | None = None


class FileNotFound(InputError, FileNotFoundError):
    """An input path, or the folder an output goes into, does not exist."""

    code = C.E_FILE_NOT_FOUND


class InvalidArgument(InputError, ValueError):
    """An argument is out of range or of the wrong kind."""

    code = C.E_INVALID_ARGUMENT


class NonFiniteInput(InputError, ValueError):
    """A tensor holds NaN or infinity."""

    code = C.E_NON_FINITE_INPUT
    tensor: str | None = None


class UnsupportedDtype(InputError, TypeError):
    """A tensor or a requested dtype is not float32, float16 or bfloat16."""

    code = C.E_UNSUPPORTED_DTYPE
    tensor: str | None = None


class IOFailure(CompeftError, OSError):
    """The operating system refused a read or a write."""

    code = C.E_IO
    path: str | None = None


# --- the file's bytes ---------------------------------------------------------------------------
class FormatError(CompeftError, ValueError):
    """The file is not a well-formed compeft file (a kind; raised as one of its subclasses)."""

    path: str | None = None


class NotSafetensors(FormatError):
    code = C.E_NOT_SAFETENSORS


class TruncatedFile(FormatError):
    code = C.E_TRUNCATED


class NotCompeft(FormatError):
    code = C.E_NOT_COMPEFT


class ManifestError(FormatError):
    code = C.E_MANIFEST_INVALID


class ManifestMismatch(FormatError):
    code = C.E_MANIFEST_MISMATCH


class VersionError(CompeftError, ValueError):
    """The file needs a newer reader: unknown major version."""

    code = C.E_UNSUPPORTED_VERSION
    version: str | None = None


class UnsupportedFeature(VersionError):
    """The file lists a required feature this reader does not implement."""

    code = C.E_UNSUPPORTED_FEATURE
    features: list[str] | None = None


class EncodingError(CompeftError, ValueError):
    """A stream cannot be decoded (a kind; raised as one of its subclasses)."""


class UnknownEncoding(EncodingError):
    code = C.E_UNKNOWN_ENCODING


class StreamCorrupt(EncodingError):
    code = C.E_STREAM_CORRUPT


class LimitExceeded(CompeftError, ValueError):
    """A declared size is over a limit of the format; refused before anything is allocated."""

    code = C.E_LIMIT_EXCEEDED


class IntegrityError(CompeftError, ValueError):
    """A digest does not match: the bytes are not the ones the writer wrote (a kind; raised as
    one of its subclasses). ``subject`` names what was hashed."""

    subject: str | None = None
    expected: str | None = None
    actual: str | None = None


class ManifestDigestMismatch(IntegrityError):
    code = C.E_MANIFEST_DIGEST_MISMATCH


class StreamDigestMismatch(IntegrityError):
    code = C.E_STREAM_DIGEST_MISMATCH


class TensorDigestMismatch(IntegrityError):
    code = C.E_TENSOR_DIGEST_MISMATCH


class ArtifactDigestMismatch(IntegrityError):
    """A downloaded file's bytes are not the ones the repository's index declares."""

    code = C.E_ARTIFACT_DIGEST_MISMATCH
    size: int | None = None
    expected_size: int | None = None


# --- models -------------------------------------------------------------------------------------
class ApplyError(CompeftError, ValueError):
    """The adapter cannot be applied to this model; the model is left as it was (a kind; raised
    as one of its subclasses)."""


class ModelMismatch(ApplyError):
    """The model lacks modules the adapter targets, or their shapes differ."""

    code = C.E_MODEL_MISMATCH
    modules: list[str] | None = None


class ConfigMismatch(ApplyError):
    """The adapter's PEFT config disagrees with its tensors."""

    code = C.E_CONFIG_MISMATCH


class BaseMismatch(ApplyError):
    """The base model an artifact is bound to is not the one given. ``expected`` is the binding
    the artifact records, ``actual`` what was found (both ``binding.BaseBinding``)."""

    code = C.E_BASE_MISMATCH
    expected: Any = None
    actual: Any = None


class UnsupportedAdapter(ApplyError):
    """The adapter type (peft_type), or a kind of tensor it holds, cannot be applied here."""

    code = C.E_UNSUPPORTED_ADAPTER


class UnsupportedModel(ApplyError):
    """The model's layers cannot take this operation (for example merging into quantised
    weights, or fingerprinting tensors whose bytes are not plain arrays)."""

    code = C.E_UNSUPPORTED_MODEL
    modules: list[str] | None = None


class RequirementMissing(CompeftError, LookupError):
    """An artifact requires another (its ``requires``, spec 3.6) that cannot be found: not among
    the paths given, not beside it, not in the model already, or (``push``) neither in the same
    push nor in the repository. ``manifest_sha256``, ``kind`` and ``name`` are the requirement's."""

    code = C.E_REQUIREMENT_MISSING
    manifest_sha256: str | None = None
    kind: str | None = None
    name: str | None = None
    path: str | None = None


# --- the Hub ------------------------------------------------------------------------------------
class HubError(CompeftError, OSError):
    """A Hub request failed for a reason none of the subclasses names."""

    code = C.E_HUB_ERROR
    repo_id: str | None = None
    revision: str | None = None
    status: int | None = None


class HubRepoNotFound(HubError):
    code = C.E_HUB_REPO_NOT_FOUND


class HubRevisionNotFound(HubError):
    code = C.E_HUB_REVISION_NOT_FOUND


class HubEntryNotFound(HubError):
    code = C.E_HUB_ENTRY_NOT_FOUND
    path: str | None = None


class HubNoIndex(HubError):
    """The repository holds no valid ``compeft-index.json``."""

    code = C.E_HUB_NO_INDEX


class HubAuthError(HubError, PermissionError):
    code = C.E_HUB_AUTH


class HubUnreachable(HubError, ConnectionError):
    code = C.E_HUB_UNREACHABLE


# --- signatures ---------------------------------------------------------------------------------
class SignatureError(CompeftError, ValueError):
    """An artifact's detached signature does not show that a trusted key signed these bytes (a
    kind; raised as one of its subclasses). ``path`` names the signature file or the artifact,
    ``key_fingerprint`` the key the signature names."""

    path: str | None = None
    key_fingerprint: str | None = None


class SignatureMissing(SignatureError):
    """A signature is required and the artifact has none."""

    code = C.E_SIGNATURE_MISSING


class SignatureMalformed(SignatureError):
    """The signature file is not a compeft signature: too large, not JSON, a member missing,
    unknown or of the wrong type, bad base64, an unknown version or algorithm."""

    code = C.E_SIGNATURE_MALFORMED


class SignatureInvalid(SignatureError):
    """The signature is by a key that is not trusted, is for other bytes (``expected`` is the
    digest it signs, ``actual`` the file's) or does not verify."""

    code = C.E_SIGNATURE_INVALID
    expected: str | None = None
    actual: str | None = None


class KeyInvalid(InputError, ValueError):
    """A key file is not an unencrypted PEM Ed25519 key of the kind needed (private to sign,
    public to verify)."""

    code = C.E_KEY_INVALID


__all__ = [
    "CODES",
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
    "ApplyError",
    "ModelMismatch",
    "ConfigMismatch",
    "BaseMismatch",
    "UnsupportedAdapter",
    "UnsupportedModel",
    "RequirementMissing",
    "HubError",
    "HubRepoNotFound",
    "HubRevisionNotFound",
    "HubEntryNotFound",
    "HubNoIndex",
    "HubAuthError",
    "HubUnreachable",
    "ArtifactDigestMismatch",
    "SignatureError",
    "SignatureMissing",
    "SignatureMalformed",
    "SignatureInvalid",
    "KeyInvalid",
]
