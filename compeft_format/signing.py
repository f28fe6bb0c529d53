"""Detached signatures: who published a compeft file, beyond whether its bytes are intact.

An Ed25519 key signs a statement that binds a file's bytes (the sha256 and size of the whole file)
and its manifest digest (``compeft.manifest_sha256``). The file's name is not part of it, so a
signed file can be renamed, pushed and pulled. The signature is stored beside the file, in
``<file>.sig`` (spec section 12): one UTF-8 JSON object of at most ``MAX_SIGNATURE_BYTES``::

    {"algorithm": "ed25519", "artifact_sha256": "<hex>", "artifact_size": 30598,
     "format": "compeft-signature", "key_fingerprint": "<hex>", "manifest_sha256": "<hex>",
     "signature": "<standard base64 of the 64-byte signature>", "version": 1}

The signed message is this object without ``signature``, as JSON with sorted keys and no
whitespace (``Signature.statement``); ``key_fingerprint`` is the sha256 of the 32-byte raw public
key. Keys are PEM files as ``openssl pkey`` reads them: the private key PKCS#8, unencrypted, mode
0600; the public key SubjectPublicKeyInfo.

A signature file is hostile input: it must be exactly that object, each member of its type and no
other member (``SignatureMalformed``). It is checked only against public keys the caller trusts,
never against a key it names itself.

Example:
    >>> from compeft_format import signing
    >>> signing.generate_keys("publisher.key")        # publisher.key and publisher.key.pub
    >>> signing.sign("adapter.cpeft.safetensors", "publisher.key")
    >>> signing.verify_signed("adapter.cpeft.safetensors", "publisher.key.pub")
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from . import constants as C
from .errors import (
    CompeftError,
    FileNotFound,
    InputError,
    InvalidArgument,
    IOFailure,
    KeyInvalid,
    SignatureInvalid,
    SignatureMalformed,
    SignatureMissing,
)
from .fileio import atomic_write_bytes
from .jsonfields import HEX64
from .reader import CompeftFile

PathLike = str | os.PathLike[str]
#: Trusted public keys: one key, or a key file, or a sequence of them.
PublicKeys = Ed25519PublicKey | PathLike | Sequence[Ed25519PublicKey | PathLike]
#: Trusted public keys by fingerprint (``trusted_keys``).
TrustedKeys = dict[str, Ed25519PublicKey]

#: Largest key file read (bytes); an Ed25519 PEM key is about 120.
MAX_KEY_BYTES = 16 * 1024
#: Suffix of the public key file ``generate_keys`` writes beside the private key.
PUBLIC_KEY_SUFFIX = ".pub"
_SIGNATURE_BYTES = 64
_MAX_SIZE = 1 << 63


def signature_path(artifact: PathLike) -> Path:
    """Where the signature of ``artifact`` is kept: ``<artifact>.sig``."""
    p = Path(artifact)
    return p.with_name(p.name + C.SIGNATURE_SUFFIX)


def key_fingerprint(key: Ed25519PublicKey | Ed25519PrivateKey) -> str:
    """sha256 (hex) of the 32-byte raw public key (of a private key's public half)."""
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return hashlib.sha256(public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)).hexdigest()


# --- keys -----------------------------------------------------------------------------------------
def generate_keys(path: PathLike) -> tuple[Path, Path]:
    """Create an Ed25519 key pair: the private key at ``path`` (mode 0600) and the public key at
    ``path.pub``. Existing files are never replaced.

    Returns:
        The paths of the private and the public key.

    Raises:
        InvalidArgument: either file exists already.
        FileNotFound: the folder does not exist.
        IOFailure: the operating system refused the write.
    """
    private_path = Path(path)
    public_path = private_path.with_name(private_path.name + PUBLIC_KEY_SUFFIX)
    for p in (private_path, public_path):
        if os.path.lexists(p):
            raise InvalidArgument(f"{p} exists; keys are never overwritten", path=str(p))
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    _create(private_path, private, 0o600)
    try:
        _create(public_path, public, 0o644)
    except BaseException:
        private_path.unlink()
        raise
    return private_path, public_path


def _create(path: Path, data: bytes, mode: int) -> None:
    """Write a new file (never an existing one, nor through a link) with at most ``mode``."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        raise InvalidArgument(f"{path} exists; keys are never overwritten", path=str(path)) from None
    except FileNotFoundError:
        raise FileNotFound(f"output folder does not exist: {path.parent}", path=str(path.parent)) from None
    except OSError as e:
        raise IOFailure(f"cannot write {path}: {e.strerror or e}", path=str(path)) from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        path.unlink()
        raise IOFailure(f"cannot write {path}: {e.strerror or e}", path=str(path)) from None


def _read_key(path: PathLike) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_KEY_BYTES + 1)
    except FileNotFoundError:
        raise FileNotFound(f"no such key file: {path}", path=str(path)) from None
    except IsADirectoryError:
        raise InputError(f"{path} is a folder, not a key file", path=str(path)) from None
    except OSError as e:
        raise IOFailure(f"cannot read {path}: {e.strerror or e}", path=str(path)) from None
    if len(data) > MAX_KEY_BYTES:
        raise KeyInvalid(f"{path} is over {MAX_KEY_BYTES:,} bytes: not a key file", path=str(path))
    return data


def load_private_key(path: PathLike) -> Ed25519PrivateKey:
    """The Ed25519 private key in a PEM file (PKCS#8, unencrypted).

    Raises:
        KeyInvalid: the file holds no such key (a public key, an encrypted or another kind of key).
        FileNotFound, IOFailure.
    """
    data = _read_key(path)
    if b"PUBLIC KEY-----" in data and b"PRIVATE KEY-----" not in data:
        raise KeyInvalid(f"{path} is a public key; signing needs the private key", path=str(path))
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise KeyInvalid(f"{path} is encrypted; compeft reads unencrypted PEM keys", path=str(path)) from None
    except (ValueError, UnsupportedAlgorithm):
        raise KeyInvalid(f"{path} is not a PEM private key", path=str(path)) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyInvalid(f"{path} is not an Ed25519 key", path=str(path))
    return key


def load_public_key(path: PathLike) -> Ed25519PublicKey:
    """The Ed25519 public key in a PEM file (SubjectPublicKeyInfo).

    Raises:
        KeyInvalid: the file holds no such key (a private key, or another kind of key).
        FileNotFound, IOFailure.
    """
    data = _read_key(path)
    if b"PRIVATE KEY-----" in data:
        raise KeyInvalid(f"{path} is a private key; verifying needs the public key ({PUBLIC_KEY_SUFFIX})",
                         path=str(path))
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm):
        raise KeyInvalid(f"{path} is not a PEM public key", path=str(path)) from None
    if not isinstance(key, Ed25519PublicKey):
        raise KeyInvalid(f"{path} is not an Ed25519 key", path=str(path))
    return key


def trusted_keys(keys: PublicKeys | TrustedKeys) -> TrustedKeys:
    """Public keys (objects or PEM files, or ``trusted_keys``' result again), by fingerprint.

    Raises:
        InvalidArgument: no key given. KeyInvalid, FileNotFound, IOFailure: a key file.
    """
    if isinstance(keys, dict):
        keys = list(keys.values())
    items = [keys] if isinstance(keys, (str, os.PathLike, Ed25519PublicKey)) else list(keys)
    if not items:
        raise InvalidArgument("no trusted public key given")
    loaded = [k if isinstance(k, Ed25519PublicKey) else load_public_key(k) for k in items]
    return {key_fingerprint(k): k for k in loaded}


# --- signature files ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Signature:
    """A detached signature: the bytes it is for, the key that made it, and the signature."""

    key_fingerprint: str
    artifact_sha256: str
    artifact_size: int
    manifest_sha256: str
    signature: bytes = b""

    def _signed(self) -> dict[str, Any]:
        fields = {k: v for k, v in asdict(self).items() if k != "signature"}
        return {"format": C.SIGNATURE_FORMAT, "version": C.SIGNATURE_VERSION, "algorithm": C.SIGNATURE_ALGORITHM,
                **fields}

    def statement(self) -> bytes:
        """The message the key signs: every member but ``signature``, as canonical JSON."""
        return json.dumps(self._signed(), sort_keys=True, separators=(",", ":")).encode("ascii")

    def to_bytes(self) -> bytes:
        """The signature file."""
        body = {**self._signed(), "signature": base64.b64encode(self.signature).decode("ascii")}
        return (json.dumps(body, indent=2, sort_keys=True) + "\n").encode("ascii")

    @classmethod
    def parse(cls, data: bytes, what: str) -> Signature:
        """Check and read a signature file (``what`` names it in errors).

        Raises:
            SignatureMalformed: anything but exactly a signature file of this version.
        """

        def malformed(reason: str) -> SignatureMalformed:
            return SignatureMalformed(f"{what}: {reason}", path=what)

        if len(data) > C.MAX_SIGNATURE_BYTES:
            raise malformed(f"over {C.MAX_SIGNATURE_BYTES:,} bytes: not a signature file")
        try:
            obj = json.loads(data.decode("utf-8"), object_pairs_hook=_unique_members)
        except _DuplicateMember as e:
            raise malformed(f"member {e.args[0]!r} appears twice") from None
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise malformed("not UTF-8 JSON") from None
        if not isinstance(obj, dict):
            raise malformed("not a JSON object")
        if set(obj) != _MEMBERS:
            missing, unknown = sorted(_MEMBERS - set(obj)), sorted(set(obj) - _MEMBERS)
            raise malformed("; ".join(
                ([f"missing {', '.join(missing)}"] if missing else []) +
                ([f"unknown member(s) {', '.join(repr(k)[:40] for k in unknown[:5])}"] if unknown else [])))
        if obj["format"] != C.SIGNATURE_FORMAT:
            raise malformed(f"format must be {C.SIGNATURE_FORMAT!r}")
        version = obj["version"]
        if isinstance(version, bool) or not isinstance(version, int):
            raise malformed("version must be an integer")
        if version != C.SIGNATURE_VERSION:
            raise malformed(f"signature version {version} is not supported (this reader knows {C.SIGNATURE_VERSION})")
        if obj["algorithm"] != C.SIGNATURE_ALGORITHM:
            raise malformed(f"algorithm must be {C.SIGNATURE_ALGORITHM!r}")
        for k in ("key_fingerprint", "artifact_sha256", "manifest_sha256"):
            if not isinstance(obj[k], str) or HEX64.fullmatch(obj[k]) is None:
                raise malformed(f"{k} must be 64 lowercase hex digits")
        size = obj["artifact_size"]
        if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size < _MAX_SIZE:
            raise malformed("artifact_size must be an integer >= 0")
        text = obj["signature"]
        try:
            if not isinstance(text, str):
                raise ValueError
            raw = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise malformed("signature must be standard base64") from None
        if len(raw) != _SIGNATURE_BYTES or base64.b64encode(raw).decode("ascii") != text:
            raise malformed(f"signature must be the base64 of {_SIGNATURE_BYTES} bytes")
        return cls(key_fingerprint=obj["key_fingerprint"], artifact_sha256=obj["artifact_sha256"],
                   artifact_size=size, manifest_sha256=obj["manifest_sha256"], signature=raw)

    def check_subject(self, *, sha256: str, size: int, manifest_sha256: str, what: str) -> None:
        """The signature is for a file of this sha256, size and manifest digest.

        Raises:
            SignatureInvalid: it is for other bytes.
        """
        if (self.artifact_sha256, self.artifact_size) != (sha256, size):
            raise SignatureInvalid(f"{what}: the signature is for other bytes (sha256 {self.artifact_sha256}, "
                                   f"{self.artifact_size} bytes; the file's is {sha256}, {size} bytes)", path=what,
                                   key_fingerprint=self.key_fingerprint, expected=self.artifact_sha256, actual=sha256)
        if self.manifest_sha256 != manifest_sha256:
            raise SignatureInvalid(f"{what}: the signature is for manifest {self.manifest_sha256}, the file's is "
                                   f"{manifest_sha256}", path=what, key_fingerprint=self.key_fingerprint,
                                   expected=self.manifest_sha256, actual=manifest_sha256)


#: every member of a signature file, of this version
_MEMBERS = frozenset({"format", "version", "algorithm", "key_fingerprint", "artifact_sha256", "artifact_size",
                      "manifest_sha256", "signature"})


class _DuplicateMember(ValueError):
    pass


def _unique_members(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateMember(k[:40])
        out[k] = v
    return out


def read_signature(path: PathLike, *, what: str | None = None) -> Signature:
    """Read and check a signature file (``what`` names it in errors; default its path).

    Raises:
        SignatureMissing: there is no such file. SignatureMalformed, IOFailure.
    """
    name = str(path) if what is None else what
    try:
        with open(path, "rb") as f:
            data = f.read(C.MAX_SIGNATURE_BYTES + 1)
    except FileNotFoundError:
        raise SignatureMissing(f"{name}: no signature (the file is not signed)", path=str(path)) from None
    except OSError as e:
        raise IOFailure(f"cannot read {name}: {e.strerror or e}", path=str(path)) from None
    return Signature.parse(data, name)


# --- signing and checking -------------------------------------------------------------------------
def sign(artifact: PathLike, key: Ed25519PrivateKey | PathLike, *, output: PathLike | None = None,
         overwrite: bool = False) -> Path:
    """Verify a compeft file fully, then write its signature by ``key`` (a private key or its PEM
    file) to ``output`` (default ``<artifact>.sig``), at once. A signature there by the same key
    is replaced; any other file (another key's signature) only with ``overwrite``.

    Returns:
        The path of the signature file.

    Raises:
        InvalidArgument: ``output`` holds something else than a signature by this key, and
            ``overwrite`` is false.
        KeyInvalid, the file errors of ``verify``, FileNotFound, IOFailure.
    """
    private = key if isinstance(key, Ed25519PrivateKey) else load_private_key(key)
    with CompeftFile(artifact) as f:
        f.verify()
        unsigned = Signature(key_fingerprint=key_fingerprint(private), artifact_sha256=f.sha256(),
                             artifact_size=f.size, manifest_sha256=f.metadata[C.META_MANIFEST_SHA256])
    dest = Path(output) if output is not None else signature_path(artifact)
    data = replace(unsigned, signature=private.sign(unsigned.statement())).to_bytes()
    if not overwrite and (dest.exists() or dest.is_symlink()):
        try:
            ours = not dest.is_symlink() and read_signature(dest).key_fingerprint == unsigned.key_fingerprint
        except (OSError, CompeftError):
            ours = False
        if not ours:
            raise InvalidArgument(f"{dest} exists and is not a signature by this key; pass --force (overwrite=True) "
                                  "to replace it", path=str(dest))
    atomic_write_bytes(dest, data)
    return dest


def authenticate(signature: Signature, keys: PublicKeys | TrustedKeys, *, sha256: str, size: int,
                 manifest_sha256: str, what: str) -> str:
    """Check that ``signature`` is a trusted key's signature of a file with this sha256, size and
    manifest digest; ``keys`` as ``trusted_keys`` takes them.

    Returns:
        The fingerprint of the key that signed.

    Raises:
        SignatureInvalid: signed by a key not trusted, for other bytes, or not a valid signature.
    """
    trusted = trusted_keys(keys)
    fp = signature.key_fingerprint
    key = trusted.get(fp)
    if key is None:
        raise SignatureInvalid(f"{what}: signed by key {fp}, which is not a trusted key", path=what, key_fingerprint=fp)
    signature.check_subject(sha256=sha256, size=size, manifest_sha256=manifest_sha256, what=what)
    try:
        key.verify(signature.signature, signature.statement())
    except InvalidSignature:
        raise SignatureInvalid(f"{what}: the signature does not verify with key {fp}", path=what,
                               key_fingerprint=fp) from None
    return fp


def verify_signed(artifact: PathLike, keys: PublicKeys | TrustedKeys, *, signature: PathLike | None = None) -> Signature:
    """Check a compeft file's signature (default ``<artifact>.sig``) with trusted public keys,
    then verify the file fully. The bytes are authenticated before any stream is decoded.

    Returns:
        The checked signature (``key_fingerprint`` names the key that signed).

    Raises:
        SignatureMissing, SignatureMalformed, SignatureInvalid, KeyInvalid, and the file errors of
        ``verify``.
    """
    trusted = trusted_keys(keys)
    with CompeftFile(artifact) as f:
        sig = read_signature(signature if signature is not None else signature_path(artifact))
        authenticate(sig, trusted, sha256=f.sha256(), size=f.size, manifest_sha256=f.metadata[C.META_MANIFEST_SHA256],
                     what=str(artifact))
        f.verify()
    return sig


__all__ = ["Signature", "PublicKeys", "TrustedKeys", "generate_keys", "load_private_key", "load_public_key", "trusted_keys",
           "key_fingerprint", "signature_path", "read_signature", "sign", "authenticate", "verify_signed",
           "MAX_KEY_BYTES", "PUBLIC_KEY_SUFFIX"]
