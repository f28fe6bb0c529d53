"""Typed errors. Every error carries a stable ``code`` from ``spec/FORMAT.md`` section 9.

Callers catch by kind (``IntegrityError``) or by base class (``CompeftError``); the CLI prints
``<code>: <message>`` on one line.
"""

from __future__ import annotations

from . import constants as C


class CompeftError(Exception):
    """Base class of every error this library raises on purpose."""

    code: str = "ERROR"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""

    def __str__(self) -> str:  # one line, always
        return " ".join(self.message.split())


class InputError(CompeftError):
    """The caller's input is wrong: bad argument, missing path, unsupported tensor."""

    code = C.E_INVALID_INPUT


class FileNotFound(InputError):
    code = C.E_FILE_NOT_FOUND


class InvalidArgument(InputError):
    code = C.E_INVALID_ARGUMENT


class NonFiniteInput(InputError):
    code = C.E_NON_FINITE_INPUT


class UnsupportedDtype(InputError):
    code = C.E_UNSUPPORTED_DTYPE


class FormatError(CompeftError):
    """The file is not a well-formed compeft file."""

    code = C.E_NOT_SAFETENSORS


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


class VersionError(CompeftError):
    """The file needs a newer reader: unknown major version or required feature."""

    code = C.E_UNSUPPORTED_VERSION


class UnsupportedFeature(VersionError):
    code = C.E_UNSUPPORTED_FEATURE


class EncodingError(CompeftError):
    """A stream cannot be decoded: unknown encoding or corrupt content."""

    code = C.E_STREAM_CORRUPT


class UnknownEncoding(EncodingError):
    code = C.E_UNKNOWN_ENCODING


class StreamCorrupt(EncodingError):
    code = C.E_STREAM_CORRUPT


class LimitExceeded(CompeftError):
    """A declared size is over a reader limit; refused before anything is allocated."""

    code = C.E_LIMIT_EXCEEDED


class IntegrityError(CompeftError):
    """A digest does not match: the bytes are not the ones the writer wrote."""

    code = C.E_STREAM_DIGEST_MISMATCH


class ManifestDigestMismatch(IntegrityError):
    code = C.E_MANIFEST_DIGEST_MISMATCH


class StreamDigestMismatch(IntegrityError):
    code = C.E_STREAM_DIGEST_MISMATCH


class TensorDigestMismatch(IntegrityError):
    code = C.E_TENSOR_DIGEST_MISMATCH


class ApplyError(CompeftError):
    """The adapter cannot be applied to this model; the model is left as it was."""

    code = C.E_MODEL_MISMATCH


class ModelMismatch(ApplyError):
    """The model lacks modules the adapter targets, or their shapes differ."""

    code = C.E_MODEL_MISMATCH


class ConfigMismatch(ApplyError):
    """The adapter's PEFT config disagrees with its tensors."""

    code = C.E_CONFIG_MISMATCH


class BaseMismatch(ApplyError):
    """The file records a base-model fingerprint and the model's weights do not match it."""

    code = C.E_BASE_MISMATCH


class UnsupportedAdapter(ApplyError):
    """The adapter type (peft_type) cannot be applied by this library."""

    code = C.E_UNSUPPORTED_ADAPTER


class HubError(CompeftError):
    """A Hub request failed; ``code`` says how."""

    code = C.E_HUB_ERROR


class HubRepoNotFound(HubError):
    code = C.E_HUB_REPO_NOT_FOUND


class HubRevisionNotFound(HubError):
    code = C.E_HUB_REVISION_NOT_FOUND


class HubEntryNotFound(HubError):
    code = C.E_HUB_ENTRY_NOT_FOUND


class HubNoIndex(HubError):
    code = C.E_HUB_NO_INDEX


class HubAuthError(HubError):
    code = C.E_HUB_AUTH


class HubUnreachable(HubError):
    code = C.E_HUB_UNREACHABLE


class ArtifactDigestMismatch(IntegrityError):
    """A downloaded file's bytes are not the ones the repository's index declares."""

    code = C.E_ARTIFACT_DIGEST_MISMATCH


class IOFailure(CompeftError):
    """The operating system refused a read or write."""

    code = C.E_IO


__all__ = [
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
    "HubError",
    "HubRepoNotFound",
    "HubRevisionNotFound",
    "HubEntryNotFound",
    "HubNoIndex",
    "HubAuthError",
    "HubUnreachable",
    "ArtifactDigestMismatch",
]
