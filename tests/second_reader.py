"""Independent reader of the compeft 1.5 format, written from spec/FORMAT.md alone (without the
reference implementation) so that the conformance vectors can be checked against the spec text.
It also computes the base-model fingerprints of spec 3.4 (`fingerprint`). `read_manifest` returns a
valid file's manifest as the spec says to interpret it (the members of 3.6 only from version 1.4)."""
import base64
import hashlib
import json
import math
import pathlib
import re
import struct

import numpy as np
import zstandard

MI, LE, UE, SC = "MANIFEST_INVALID", "LIMIT_EXCEEDED", "UNKNOWN_ENCODING", "STREAM_CORRUPT"
NS, MM = "NOT_SAFETENSORS", "MANIFEST_MISMATCH"
MIB64, MAXEL, MAXTENSORS = 1 << 26, 1 << 36, 1_000_000
ST_SIZES = {"U8": 1, "I8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "I16": 2, "F16": 2,
            "BF16": 2, "U32": 4, "I32": 4, "F32": 4, "U64": 8, "I64": 8, "F64": 8}
ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}
CODINGS = {"bitmap": ("positions",), "golomb": ("unary", "remainders", "extra")}
TAIL = {"ternary": ("signs",), "sparse": ("values",), "dense": ("values",)}
HEX = re.compile(r"[0-9a-f]{64}")
VERSION = re.compile(r"(0|[1-9][0-9]{0,5})\.(0|[1-9][0-9]{0,5})")
B64 = re.compile(r"(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?")
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


class SpecError(Exception):
    def __init__(self, code, message=""):
        super().__init__(f"{code}: {message}" if message else code)
        self.code = code


def _req(cond, code, message=""):
    if not cond:
        raise SpecError(code, message)


class _NegZero(int):
    """The JSON number `-0` without fraction: 0 as an integer, -0.0 as a number (3.1)."""


def _int_literal(text):
    return _NegZero(0) if text == "-0" else int(text)


def _nat(v):
    return type(v) in (int, _NegZero) and v >= 0


def _one_of(v, options):
    return isinstance(v, str) and v in options


def _str_or_null(v):
    return v is None or isinstance(v, str)


def _number(v):
    return type(v) in (int, _NegZero) or (type(v) is float and math.isfinite(v))


def _f32(v):
    """The binary32 value of an "f32" field (3.1), or None when the field is not one."""
    if type(v) not in (int, float, _NegZero):
        return None
    try:
        x = -0.0 if type(v) is _NegZero else float(v)
        y = struct.unpack("<f", struct.pack("<f", x))[0]
    except OverflowError:
        return None
    return np.float32(x) if math.isfinite(x) and y == x else None


def _reject_constant(name):
    raise ValueError(name)


def _json(text, code):
    try:
        return json.loads(text, parse_constant=_reject_constant, parse_int=_int_literal)
    except (ValueError, RecursionError):
        raise SpecError(code, "not JSON") from None


def _scalars(v):
    """True when every string of a parsed JSON value (keys included) is Unicode scalar values."""
    if isinstance(v, str):
        return not any(0xD800 <= ord(c) <= 0xDFFF for c in v)
    if isinstance(v, dict):
        return all(_scalars(k) and _scalars(x) for k, x in v.items())
    if isinstance(v, list):
        return all(_scalars(x) for x in v)
    return True


def _container(buf):
    _req(len(buf) >= 8, "TRUNCATED", "shorter than 8 bytes")
    n = struct.unpack_from("<Q", buf)[0]
    _req(n <= MIB64, NS, "header over 64 MiB")
    _req(n <= len(buf) - 8, "TRUNCATED", "header beyond end of file")
    try:
        text = buf[8:8 + n].decode("utf-8")
    except UnicodeDecodeError:
        raise SpecError(NS, "header not UTF-8") from None
    hdr = _json(text, NS)
    _req(isinstance(hdr, dict), NS, "header not an object")
    _req(_scalars(hdr), NS, "a header string holds a lone surrogate")
    meta = hdr.get("__metadata__")
    meta = {} if meta is None else meta
    _req(isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values()), NS, "bad __metadata__")
    tensors = {}
    for name, t in hdr.items():
        if name == "__metadata__":
            continue
        _req(isinstance(t, dict) and _one_of(t.get("dtype"), ST_SIZES), NS, f"bad entry {name!r}")
        shape, offs = t.get("shape"), t.get("data_offsets")
        _req(isinstance(shape, list) and all(_nat(d) for d in shape), NS, f"bad shape {name!r}")
        _req(isinstance(offs, list) and len(offs) == 2 and all(_nat(x) for x in offs)
             and offs[0] <= offs[1], NS, f"bad data_offsets {name!r}")
        _req(offs[1] - offs[0] == math.prod(shape) * ST_SIZES[t["dtype"]], NS, f"size of {name!r}")
        tensors[name] = (t["dtype"], shape, offs[0], offs[1])
    end = 0
    for b, e in sorted((b, e) for (_, _, b, e) in tensors.values()):
        _req(b == end, NS, "gap or overlap in data section")
        end = e
    _req(len(buf) - 8 - n >= end, "TRUNCATED", "data section too short")
    _req(len(buf) - 8 - n == end, NS, "trailing bytes")
    return 8 + n, meta, tensors


def _frame_content_size(b, code):
    """Parse a zstd frame header (RFC 8878 3.1.1); return Frame_Content_Size or None."""
    _req(len(b) >= 5 and b[:4] == ZSTD_MAGIC, code, "not a zstd frame")
    fhd = b[4]
    single, did_flag, fcs_flag = (fhd >> 5) & 1, fhd & 3, fhd >> 6
    _req(not fhd & 0x08, code, "reserved frame header bit set")
    i = 5 + (1 - single)
    dsz, fsz = (0, 1, 2, 4)[did_flag], (single, 2, 4, 8)[fcs_flag]
    _req(len(b) >= i + dsz + fsz, code, "short frame header")
    _req(int.from_bytes(b[i:i + dsz], "little") == 0, code, "frame names a dictionary")
    if fsz == 0:
        return None
    fcs = int.from_bytes(b[i + dsz:i + dsz + fsz], "little")
    return fcs + 256 if fsz == 2 else fcs


DICT1_SHA256 = "476e603d854736851ab59d01d56f1f80eb48c9cd926040a7dcf13da6283813fd"
_DICT1 = []


def _dict1():
    """The manifest dictionary of spec 2.4, read from the spec folder and checked by its digest."""
    if not _DICT1:
        data = (pathlib.Path(__file__).resolve().parent.parent / "spec" / "manifest-dictionary-1.txt").read_bytes()
        assert hashlib.sha256(data).hexdigest() == DICT1_SHA256, "manifest dictionary differs from the spec's"
        _DICT1.append(zstandard.ZstdCompressionDict(data, dict_type=zstandard.DICT_TYPE_RAWCONTENT))
    return _DICT1[0]


def _inflate(b, size, code, dictionary=None):
    try:
        out = zstandard.ZstdDecompressor(dict_data=dictionary).decompress(b, max_output_size=size,
                                                                        allow_extra_data=False)
    except zstandard.ZstdError as e:
        raise SpecError(code, f"zstd: {e}") from None
    _req(len(out) == size, code, "decompressed length")
    return out


def _manifest_text(meta):
    _req("compeft.manifest" in meta and "compeft.manifest_sha256" in meta, MI, "manifest key missing")
    for key in ("compeft.manifest", "compeft.manifest_sha256", "compeft.manifest_encoding"):
        try:
            meta.get(key, "").encode("utf-8")
        except UnicodeEncodeError:
            raise SpecError(MI, f"{key} is not valid Unicode") from None
    enc, stored = meta.get("compeft.manifest_encoding", "json"), meta["compeft.manifest"]
    if enc == "json":
        data = stored.encode("utf-8")
    elif enc in ("zstd+base64", "zstd+dict1+base64"):
        _req(B64.fullmatch(stored) is not None, MI, "bad base64")
        frame = base64.b64decode(stored, validate=True)
        fcs = _frame_content_size(frame, MI)
        _req(fcs is not None, MI, "manifest frame without content size")
        _req(fcs <= MIB64, LE, "manifest over 64 MiB")
        data = _inflate(frame, fcs, MI, _dict1() if enc == "zstd+dict1+base64" else None)
    else:
        raise SpecError(UE, f"manifest encoding {enc!r}")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise SpecError(MI, "manifest not UTF-8") from None
    _req(meta["compeft.manifest_sha256"] == hashlib.sha256(data).hexdigest(), "MANIFEST_DIGEST_MISMATCH")
    return text


def _check_groups(G):
    groups = []
    for g in G:
        _req(isinstance(g, dict) and "encoding" in g, MI, "bad group")
        enc = g["encoding"]
        _req(_one_of(enc, TAIL), UE, f"encoding {enc!r}")
        params = g.get("params", {})
        _req(isinstance(params, dict), MI, "params")
        pc = params.get("positions") if enc != "dense" else None
        _req(enc == "dense" or _one_of(pc, CODINGS), UE, "params.positions")
        vd = params.get("value_dtype") if enc != "ternary" else None
        _req(enc == "ternary" or _one_of(vd, ITEMSIZE), UE, "params.value_dtype")
        roles = CODINGS.get(pc, ()) + TAIL[enc]
        S = g.get("streams")
        _req(isinstance(S, dict) and set(S) == set(roles), MI, "stream roles")
        streams = []
        for role in roles:
            s = S[role]
            _req(isinstance(s, dict) and "compression" in s, MI, f"stream {role}")
            _req(_one_of(s["compression"], ("none", "zstd")), UE, "stream compression")
            _req(isinstance(s.get("name"), str) and _scalars(s["name"]) and s["name"] != "__metadata__",
                 MI, "stream name")
            _req(_nat(s.get("size")) and _nat(s.get("raw_size")), MI, "stream size")
            _req(isinstance(s.get("sha256"), str) and HEX.fullmatch(s["sha256"]), MI, "stream sha256")
            streams.append(dict(s, role=role))
        dsha = g.get("decoded_sha256")
        _req(dsha is None or (isinstance(dsha, str) and HEX.fullmatch(dsha)), MI, "group decoded_sha256")
        groups.append({"enc": enc, "pc": pc, "vd": vd, "streams": streams, "members": [], "dsha": dsha})
    return groups


def _check_tensor(t, groups):
    _req(isinstance(t, dict) and isinstance(t.get("name"), str), MI, "bad tensor")
    try:
        _req(len(t["name"].encode("utf-8")) <= 1024, LE, "tensor name over 1024 bytes")
    except UnicodeEncodeError:
        raise SpecError(MI, "tensor name not Unicode scalar values") from None
    shape = t.get("shape")
    _req(isinstance(shape, list), MI, "shape")
    _req(len(shape) <= 8, LE, "rank over 8")
    for d in shape:
        _req(_nat(d), MI, "dimension")
        _req(d <= MAXEL, LE, "dimension over 2^36")
    numel = math.prod(shape)
    _req(numel <= MAXEL, LE, "numel over 2^36")
    _req(_one_of(t.get("dtype"), ITEMSIZE), MI, "dtype")
    gi = t.get("group")
    _req(_nat(gi) and gi < len(groups), MI, "group")
    enc, nnz = groups[gi]["enc"], t.get("nnz")
    _req(_nat(nnz) and nnz <= numel and (enc != "dense" or nnz == numel), MI, "nnz")
    scale = _f32(t.get("scale"))
    _req(scale is not None if enc == "ternary" else t.get("scale") is None, MI, "scale")
    offset = _f32(t.get("offset", 0))
    _req(offset is not None and (enc != "dense" or offset == 0), MI, "offset")
    sha = t.get("sha256")
    _req(sha is None or (isinstance(sha, str) and HEX.fullmatch(sha)), MI, "sha256")
    return {"name": t["name"], "shape": tuple(shape), "numel": numel, "dtype": t["dtype"], "group": gi,
            "nnz": nnz, "scale": scale, "offset": offset + np.float32(0), "sha256": sha}


def _check_base(bm, where):
    """`id`, `revision` and `fingerprint` of `base_model` or of `base_model.derived_from` (3.4, 3.5)."""
    _req(_str_or_null(bm.get("id")), MI, f"{where}.id")
    _req(_str_or_null(bm.get("revision")), MI, f"{where}.revision")
    fp = bm.get("fingerprint")
    _req(fp is None or (isinstance(fp, dict) and isinstance(fp.get("algorithm"), str)
                        and isinstance(fp.get("value"), str)), MI, f"{where}.fingerprint")


def _check_recovery_config(rc):
    """`adapter.recovery` (3.6): `r` integer >= 1, `alpha` number, `activation` string."""
    _req(isinstance(rc, dict), MI, "adapter.recovery")
    _req(_nat(rc.get("r")) and rc["r"] >= 1, MI, "adapter.recovery.r")
    _req(_number(rc.get("alpha")), MI, "adapter.recovery.alpha")
    _req(isinstance(rc.get("activation"), str), MI, "adapter.recovery.activation")


def _check_descriptive(m, v14):
    _req(isinstance(m.get("required_features", []), list), MI, "required_features")
    ad, bm = m.get("adapter", {}), m.get("base_model", {})
    co, pr = m.get("compression", {}), m.get("provenance", {})
    _req(all(isinstance(x, dict) for x in (ad, bm, co, pr)), MI, "descriptive member not an object")
    _req(_one_of(ad.get("representation", "weights"), ("weights", "delta")), MI, "representation")
    _req(ad.get("peft_config") is None or isinstance(ad["peft_config"], dict), MI, "peft_config")
    if v14 and ad.get("recovery") is not None:
        _check_recovery_config(ad["recovery"])
    if _kind(m, v14) == "recovery":
        _req(ad.get("representation", "weights") == "weights", MI, "a recovery artifact's representation")
    _check_base(bm, "base_model")
    df = bm.get("derived_from")
    _req(df is None or isinstance(df, dict), MI, "base_model.derived_from")
    if df is not None:
        _check_base(df, "base_model.derived_from")  # its other members are ignored (3.5)
    # recipe: object or null; its members are informative and any are accepted (3.5)
    _req(bm.get("recipe") is None or isinstance(bm["recipe"], dict), MI, "base_model.recipe")
    _req(isinstance(co.get("method", "none"), str), MI, "compression.method")
    _req(all(co.get(k) is None or _number(co[k]) for k in ("density", "alpha", "sigma")), MI, "numbers")
    _req(all(_str_or_null(co.get(k)) for k in ("scope", "mode", "reference")), MI, "compression strings")
    _req(_nat(co.get("candidates", 0)) and _nat(co.get("kept", 0)), MI, "candidates/kept")
    _req(isinstance(pr.get("tool", ""), str), MI, "provenance.tool")
    _req(_str_or_null(pr.get("created_at")) and _str_or_null(pr.get("source")), MI, "provenance")
    # provenance.training (1.4) is informative: any value is accepted
    _req(_str_or_null(m.get("library_version", "")), MI, "library_version")
    if v14:
        reqs = m.get("requires", [])
        _req(isinstance(reqs, list), MI, "requires")
        for r in reqs:
            _req(isinstance(r, dict) and isinstance(r.get("kind"), str), MI, "requires[].kind")
            _req(isinstance(r.get("manifest_sha256"), str) and HEX.fullmatch(r["manifest_sha256"]), MI,
                 "requires[].manifest_sha256")
            _req(_str_or_null(r.get("name")), MI, "requires[].name")


def _kind(m, v14):
    """`adapter.kind` as a reader treats it (3.5): unknown values, and `recovery` before 1.4, are `other`."""
    kind = m.get("adapter", {}).get("kind", "other") if isinstance(m.get("adapter", {}), dict) else "other"
    kinds = ("lora", "ia3", "full", "other") + (("recovery",) if v14 else ())
    return kind if _one_of(kind, kinds) else "other"


A1, A2 = ".recovery_A1.weight", ".recovery_A2.weight"


def _check_recovery_tensors(m, tensors):
    """The tensors of a recovery artifact (3.6)."""
    rc = m["adapter"].get("recovery")
    _req(rc is not None, MI, "adapter.recovery missing")
    have = {}
    for t in tensors:
        name, shape = t["name"], t["shape"]
        suffix = A1 if name.endswith(A1) else A2 if name.endswith(A2) else None
        _req(suffix is not None and len(name) > len(suffix), MI, f"recovery tensor name {name!r}")
        _req(len(shape) == 2, MI, f"recovery tensor {name!r} is not 2-dimensional")
        _req(shape[0 if suffix == A1 else 1] == rc["r"], MI, f"rank of {name!r}")
        _req(min(shape) > 0, MI, f"empty dimension in {name!r}")
        have.setdefault(name[:-len(suffix)], set()).add(suffix)
    for module in sorted(have):
        _req(have[module] == {A1, A2}, MI, f"recovery module {module!r} lacks a factor")


def _check_manifest(m, v14=True):
    _req(isinstance(m, dict), MI, "manifest not an object")
    T, G = m.get("tensors"), m.get("groups")
    _req(isinstance(T, list) and isinstance(G, list), MI, "tensors/groups")
    _req(len(T) <= MAXTENSORS, LE, "too many tensors")
    groups = _check_groups(G)
    tensors = [_check_tensor(t, groups) for t in T]
    _check_descriptive(m, v14)
    _req(len({t["name"] for t in tensors}) == len(tensors), MI, "duplicate tensor names")
    snames = [s["name"] for g in groups for s in g["streams"]]
    _req(len(set(snames)) == len(snames), MI, "duplicate stream names")
    for t in tensors:
        groups[t["group"]]["members"].append(t)
    for g in groups:
        _req(g["members"], MI, "group without members")
        n, k = sum(t["numel"] for t in g["members"]), sum(t["nnz"] for t in g["members"])
        _req(n <= MAXEL, LE, "group over 2^36 elements")
        b = ITEMSIZE.get(g["vd"], 0)
        F = sum(t["nnz"] * _golomb_param(t["numel"], t["nnz"])[1] for t in g["members"])
        implied = {"positions": -(-n // 8), "unary": -(-(n + k) // 8), "remainders": -(-F // 8),
                   "extra": -(-k // 8), "signs": -(-k // 8), "values": (k if g["enc"] == "sparse" else n) * b}
        for s in g["streams"]:
            want, at_most = implied[s["role"]], s["role"] in ("unary", "extra")
            _req(s["raw_size"] <= want if at_most else s["raw_size"] == want, MI, f"raw_size of {s['name']!r}")
        for s in g["streams"]:
            _req(s["compression"] != "none" or s["size"] == s["raw_size"], MI, f"size of {s['name']!r}")
    if _kind(m, v14) == "recovery":
        _check_recovery_tensors(m, tensors)
    return groups, tensors


def _unframe(stored, s):
    if s["compression"] == "none":
        _req(len(stored) == s["raw_size"], SC, "stored length")
        return stored
    fcs = _frame_content_size(stored, SC)
    _req(fcs is not None and fcs == s["raw_size"], SC, "Frame_Content_Size")
    return _inflate(stored, fcs, SC)


def _bits(raw):
    return np.unpackbits(np.frombuffer(raw, np.uint8), bitorder="little")


def _plane(raw, n):
    bits = _bits(raw)
    _req(not bits[n:].any(), SC, "nonzero padding bits")
    return bits[:n].astype(bool)


def _golomb_param(numel, nnz):
    """(m, w, u) of a member (4.7.2), in exact integer arithmetic."""
    m = max(1, ((numel - nnz) * 45426 + nnz * 32768) // (nnz * 65536)) if nnz else 1
    b = (m - 1).bit_length()
    return (m, b - 1, (1 << b) - m) if m > 1 else (1, 0, 0)


def _golomb(members, raw):
    """Concatenated element indices of the entries of a `golomb` group (4.7.2), with every check."""
    nnz = np.array([t["nnz"] for t in members], np.int64)
    k = int(nnz.sum())
    par = np.array([_golomb_param(t["numel"], t["nnz"]) for t in members], np.int64).reshape(-1, 3)
    mid = np.repeat(np.arange(len(members)), nnz)
    m, w, u = par[mid, 0], par[mid, 1], par[mid, 2]
    numel = np.array([t["numel"] for t in members], np.int64)[mid]
    ones = np.flatnonzero(_bits(raw["unary"]))
    _req(len(ones) == k, SC, "unary does not hold exactly k one bits")
    _req(len(raw["unary"]) == (int(ones[-1]) // 8 + 1 if k else 0), SC, "bytes after the last unary code")
    q = np.diff(ones, prepend=-1) - 1
    _req(not (q > (numel - 1) // m).any(), SC, "position beyond numel")  # q*m >= numel; no overflow below
    F = int(w.sum())
    rbits = _bits(raw["remainders"])
    _req(len(raw["remainders"]) == -(-F // 8) and not rbits[F:].any(), SC, "remainders length or padding")
    offs, x = np.cumsum(w) - w, np.zeros(k, np.int64)
    for bit in range(int(w.max(initial=0))):
        sel = w > bit
        x[sel] |= rbits[offs[sel] + bit].astype(np.int64) << bit
    need = (m > 1) & (x >= u)
    E = int(np.count_nonzero(need))
    ebits = _bits(raw["extra"])
    _req(len(raw["extra"]) == -(-E // 8) and not ebits[E:].any(), SC, "extra length or padding")
    e = np.zeros(k, np.int64)
    e[need] = ebits[:E]
    r = np.where(need, 2 * x + e - u, x)
    _req(not (r >= m).any(), SC, "remainder not below m")
    step = q * m + r + 1
    idx, K, base = np.empty(k, np.int64), 0, 0
    for t in members:
        p = np.cumsum(step[K:K + t["nnz"]]) - 1
        _req(not t["nnz"] or p[-1] < t["numel"], SC, f"position beyond numel in {t['name']!r}")
        idx[K:K + t["nnz"]] = p + base
        K, base = K + t["nnz"], base + t["numel"]
    return idx


def _to_f32(raw, dtype):
    if dtype == "bfloat16":
        return (np.frombuffer(raw, "<u2").astype(np.uint32) << 16).view(np.float32)
    return np.frombuffer(raw, "<f4" if dtype == "float32" else "<f2").astype(np.float32)


def _from_f32(x, dtype):
    """Round binary32 values once, RNE, to the target dtype; NaN maps to a quiet NaN of the same sign."""
    x = np.ascontiguousarray(x, np.float32)
    u = x.view(np.uint32).astype(np.uint64)
    nan = np.isnan(x)
    if dtype == "float32":
        return x.astype("<f4").tobytes()
    if dtype == "float16":
        with np.errstate(over="ignore"):
            h = x.astype("<f2").view("<u2").copy()
        h[nan] = ((u[nan] >> 16) & 0x8000) | 0x7E00 | ((u[nan] >> 13) & 0x3FF)
        return h.astype("<u2").tobytes()
    h = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    h[nan] = (u[nan] >> 16) | 0x0040
    return h.astype("<u2").tobytes()


def _decode_group(g, raw):
    members, n = g["members"], sum(t["numel"] for t in g["members"])
    starts = np.cumsum([0] + [t["numel"] for t in members])
    kstarts = np.cumsum([0] + [t["nnz"] for t in members])
    out = []
    if g["enc"] == "dense":
        vals = raw["values"]
        b = ITEMSIZE[g["vd"]]
        for t, e in zip(members, starts[:-1], strict=True):
            chunk = vals[e * b:(e + t["numel"]) * b]
            out.append(chunk if g["vd"] == t["dtype"] else _from_f32(_to_f32(chunk, g["vd"]), t["dtype"]))
        return out
    k = int(kstarts[-1])
    if g["pc"] == "bitmap":
        pos = _plane(raw["positions"], n)
        for t, e in zip(members, starts[:-1], strict=True):
            _req(np.count_nonzero(pos[e:e + t["numel"]]) == t["nnz"], SC, f"popcount of {t['name']!r}")
        idx = np.flatnonzero(pos)
    else:
        idx = _golomb(members, raw)
    signs = _plane(raw["signs"], k) if g["enc"] == "ternary" else None
    values = _to_f32(raw["values"], g["vd"]) if g["enc"] == "sparse" else None
    for t, e, kk in zip(members, starts[:-1], kstarts[:-1], strict=True):
        o, sel = t["offset"], slice(int(kk), int(kk) + t["nnz"])
        if g["enc"] == "ternary":
            s = t["scale"]
            bg, p, q = (np.float32(0), s, -s) if o == 0 else (o, o + s, o - s)
            v = np.where(signs[sel], np.float32(q), np.float32(p)).astype(np.float32)
        else:
            bg, v = o, (values[sel] if o == 0 else values[sel] + o)
        x = np.full(t["numel"], bg, np.float32)
        x[idx[sel] - e] = v
        out.append(_from_f32(x, t["dtype"]))
    return out


def read(path):
    """Decode every tensor of a valid file: name -> (dtype, shape, bytes); SpecError otherwise."""
    return _read(path)[0]


def read_manifest(path):
    """A valid file's version and manifest as a reader interprets them: `adapter.kind` as 3.5 says;
    `adapter.recovery`, `requires` and `provenance.training` dropped from files before 1.4 (3.6),
    `provenance.source_metadata` from files before 1.5 (3.5)."""
    _, version, m = _read(path)
    v14 = tuple(int(x) for x in version.split(".")) >= (1, 4)
    v15 = tuple(int(x) for x in version.split(".")) >= (1, 5)
    ad = dict(m.get("adapter", {}), kind=_kind(m, v14))
    pr = dict(m.get("provenance", {}))
    if not v14:
        ad.pop("recovery", None)
        pr.pop("training", None)
    if not v15:  # provenance.source_metadata (1.5) is an unknown member before 1.5
        pr.pop("source_metadata", None)
    return version, dict(m, adapter=ad, provenance=pr, requires=m.get("requires", []) if v14 else [])


def _read(path):
    try:
        with open(path, "rb") as f:
            buf = f.read()
    except OSError as e:
        code = {FileNotFoundError: "FILE_NOT_FOUND", IsADirectoryError: "INVALID_INPUT"}.get(type(e), "IO_ERROR")
        raise SpecError(code, str(e)) from None
    data_start, meta, table = _container(buf)
    _req(meta.get("compeft.format") == "compeft", "NOT_COMPEFT")
    version = meta.get("compeft.version")
    _req(isinstance(version, str) and VERSION.fullmatch(version) is not None, MI, "compeft.version")
    _req(version.split(".")[0] == "1", "UNSUPPORTED_VERSION", version)
    manifest = _json(_manifest_text(meta), MI)
    if isinstance(manifest, dict) and isinstance(manifest.get("required_features"), list):
        _req(not manifest["required_features"], "UNSUPPORTED_FEATURE", str(manifest["required_features"]))
    v14 = (int(version.split(".")[0]), int(version.split(".")[1])) >= (1, 4)
    groups, tensors = _check_manifest(manifest, v14)
    streams = [s for g in groups for s in g["streams"]]
    names = {s["name"] for s in streams}
    _req(set(table) <= names, MM, "safetensors tensor not in manifest")
    _req(names <= set(table), MM, "manifest stream missing")
    for s in streams:
        dtype, shape, _, _ = table[s["name"]]
        _req(dtype == "U8" and len(shape) == 1 and shape[0] == s["size"], MM, f"stream {s['name']!r}")
    result = {}
    for g in groups:
        raw = {}
        for s in g["streams"]:
            _, _, b, e = table[s["name"]]
            stored = buf[data_start + b:data_start + e]
            _req(hashlib.sha256(stored).hexdigest() == s["sha256"], "STREAM_DIGEST_MISMATCH", s["name"])
            raw[s["role"]] = _unframe(stored, s)
        decoded = _decode_group(g, raw)
        _req(g["dsha"] is None or hashlib.sha256(b"".join(decoded)).hexdigest() == g["dsha"],
             "TENSOR_DIGEST_MISMATCH", "group decoded_sha256")
        for t, data in zip(g["members"], decoded, strict=True):
            _req(t["sha256"] is None or hashlib.sha256(data).hexdigest() == t["sha256"],
                 "TENSOR_DIGEST_MISMATCH", t["name"])
            result[t["name"]] = (t["dtype"], t["shape"], data)
    return result, version, manifest


# Base-model fingerprints (spec 3.4).

FP_AS_STORED, FP_FLOAT32 = "sha256-state-dict-v1", "sha256-state-dict-f32-v1"
FP_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8, "int8": 1, "int16": 2, "int32": 4,
               "int64": 8, "uint8": 1, "bool": 1, "float8_e4m3fn": 1, "float8_e5m2": 1}
_FP_ESCAPES = {0x22: '\\"', 0x5C: "\\\\", 0x08: "\\b", 0x09: "\\t", 0x0A: "\\n", 0x0C: "\\f", 0x0D: "\\r"}


def _fp_json_name(name):
    """NAME of 3.4: a JSON string escaped to ASCII, `\\uXXXX` in lowercase hex, surrogate pairs above U+FFFF."""
    out = ['"']
    for ch in name:
        c = ord(ch)
        if c in _FP_ESCAPES:
            out.append(_FP_ESCAPES[c])
        elif 0x20 <= c <= 0x7E:
            out.append(ch)
        elif c > 0xFFFF:
            c -= 0x10000
            out.append(f"\\u{0xD800 + (c >> 10):04x}\\u{0xDC00 + (c & 0x3FF):04x}")
        else:
            out.append(f"\\u{c:04x}")
    out.append('"')
    return "".join(out)


def _e4m3fn_table():
    """binary32 value of every float8_e4m3fn byte (bias 7, no infinities, S.1111.111 is NaN): all exact."""
    b = np.arange(256, dtype=np.uint32)
    s, e, f = b >> 7, (b >> 3) & 15, (b & 7).astype(np.float64)
    mag = np.where(e == 0, f * 2.0 ** -9, (1 + f / 8) * 2.0 ** (e.astype(np.float64) - 7))
    x = np.where(s == 1, -mag, mag).astype(np.float32)
    nan = (e == 15) & ((b & 7) == 7)
    x.view(np.uint32)[nan] = (s[nan] << 31) | 0x7F800000 | ((b[nan] & 7) << 20)  # sign and payload kept
    return x


def _fp_to_f32(dtype, data):
    """Elements of a floating-point dtype converted to binary32 (3.4): exact from the formats binary32
    contains, RNE from float64, every NaN as the bits 0x7FC00000."""
    if dtype == "float32":
        x = np.frombuffer(data, "<f4")
    elif dtype == "bfloat16":  # the upper 16 bits of a binary32
        x = (np.frombuffer(data, "<u2").astype("<u4") << 16).view("<f4")
    elif dtype == "float16":
        x = np.frombuffer(data, "<f2").astype("<f4")
    elif dtype == "float64":
        with np.errstate(over="ignore", invalid="ignore"):  # overflow goes to infinity (RNE, section 1)
            x = np.frombuffer(data, "<f8").astype("<f4")
    elif dtype == "float8_e5m2":  # the upper 8 bits of a binary16
        x = (np.frombuffer(data, np.uint8).astype("<u2") << 8).view("<f2").astype("<f4")
    elif dtype == "float8_e4m3fn":
        x = _e4m3fn_table()[np.frombuffer(data, np.uint8)].astype("<f4")
    else:
        raise ValueError(f"no binary32 conversion for floating-point dtype {dtype!r}")
    u = x.view("<u4").copy()
    u[np.isnan(x)] = 0x7FC00000
    return u.tobytes()


def fingerprint(tensors, algorithm):
    """Hex digest of spec 3.4's fingerprint. `tensors` maps each name to (dtype_name, shape, data): the
    dtype name of 3.4 (`float32`, ..., `bool`), a tuple of ints, the elements in C order as little-endian
    bytes of that dtype."""
    if algorithm not in (FP_AS_STORED, FP_FLOAT32):
        raise ValueError(f"unknown fingerprint algorithm {algorithm!r}")
    h = hashlib.sha256()
    for name in sorted(tensors):  # Python compares str by code points
        dtype, shape, data = tensors[name]
        shape, data = tuple(shape), bytes(data)
        if not (isinstance(name, str) and isinstance(dtype, str) and all(_nat(d) for d in shape)):
            raise ValueError(f"bad tensor {name!r}")
        numel = math.prod(shape)
        if dtype in FP_ITEMSIZE and len(data) != numel * FP_ITEMSIZE[dtype]:
            raise ValueError(f"{name!r}: {len(data)} bytes for {numel} {dtype} elements")
        if algorithm == FP_FLOAT32 and (dtype in ("float16", "bfloat16", "float32", "float64")
                                        or dtype.startswith("float8")):
            dtype, data = "float32", _fp_to_f32(dtype, data)
        line = (f'{{"name":{_fp_json_name(name)},"dtype":{_fp_json_name(dtype)},'
                f'"shape":[{",".join(map(str, shape))}]}}\n')
        h.update(line.encode("ascii"))
        if numel:
            h.update(data)
    return h.hexdigest()
