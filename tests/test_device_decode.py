"""The Triton decode kernels against the CPU decoders, bit for bit, on valid and damaged streams.

On a machine with a CUDA GPU the kernels run there; elsewhere they run on the CPU in Triton's
interpreter (``conftest`` sets ``TRITON_INTERPRET=1`` when there is no GPU), so that every
kernel is checked on every machine the tests run on.
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch

import compeft_format as cf
from compeft_format import constants as C
from compeft_format import device_decode
from compeft_format.codecs import get_codec
from compeft_format.manifest import TensorInfo
from conftest import bits_equal

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CODINGS = [C.POSITIONS_BITMAP, C.POSITIONS_GOLOMB]
KINDS = ["ternary", "sparse-float32", "sparse-float16", "sparse-bfloat16"]
TARGETS = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def kernels_on(monkeypatch):
    monkeypatch.setenv(device_decode.ENV_KERNELS, "triton")


def _values(rng: np.random.Generator, n: int, vdt: torch.dtype) -> torch.Tensor:
    """Values with the cases rounding gets wrong: signed zeros, subnormals, halfway points, values
    that overflow float16, infinities."""
    v = rng.normal(size=n).astype(np.float32) * np.float32(rng.choice([1e-3, 1.0, 300.0]))
    special = np.array([-0.0, 0.0, 1e-40, -1e-42, 65519.0, 65520.0, -7e4, 1e38, np.inf, -np.inf,
                        1.0 + 2.0 ** -11, 1.0 + 3 * 2.0 ** -11, 1.0 + 2.0 ** -8, 6.0e-8], dtype=np.float32)
    pick = rng.random(n) < 0.3
    v[pick] = rng.choice(special, size=int(pick.sum()))
    return torch.from_numpy(v).to(vdt)


def random_group(rng: np.random.Generator, kind: str, sizes: list[int] | None = None) -> list[cf.CompressedTensor]:
    """Members of one group: empty tensors, tensors with no entries, with every element an entry,
    and sparse ones; with and without offsets."""
    sizes = sizes if sizes is not None else list(rng.choice([0, 1, 7, 64, 333, 2048, 5000], size=int(rng.integers(1, 6))))
    out = []
    for j, numel in enumerate(int(n) for n in sizes):
        nnz = int(rng.choice([0, numel, max(0, numel // 2), int(numel * rng.uniform(0.001, 0.3))]))
        idx = np.sort(rng.choice(numel, size=nnz, replace=False)) if nnz else np.zeros(0, np.int64)
        offset = 0.0 if rng.random() < 0.5 else float(np.float32(rng.normal() * rng.choice([1e-3, 1.0, 1e4])))
        shape = (numel // 4, 4) if numel % 4 == 0 and numel else (numel,)
        if kind == "ternary":
            scale = float(np.float32(rng.uniform(1e-4, 3.0)))
            out.append(cf.CompressedTensor.ternary(f"t{j}", shape, "float16", idx, rng.random(nnz) < 0.5, scale, offset))
        else:
            vdt = getattr(torch, kind.split("-")[1])
            out.append(cf.CompressedTensor.sparse(f"t{j}", shape, "float32", idx, _values(rng, nnz, vdt), offset))
    return out


def params_of(kind: str, coding: str) -> dict:
    return {"positions": coding} if kind == "ternary" else {"positions": coding, "value_dtype": kind.split("-")[1]}


def encoded(kind: str, coding: str, group: list[cf.CompressedTensor]) -> tuple[dict, list[TensorInfo], dict]:
    params = params_of(kind, coding)
    raw = get_codec(group[0].encoding).encode(group, params)
    infos = [TensorInfo(m.name, m.shape, m.dtype, m.nnz, m.scale, m.offset, group=0) for m in group]
    return params, infos, {r: np.frombuffer(b, dtype=np.uint8) for r, b in raw.items()}


def cpu_decode(kind, params, infos, raw, tdt):
    """The CPU decoders' tensors, or the ``StreamCorrupt`` they raise."""
    t = {r: torch.frombuffer(bytearray(a.tobytes()), dtype=torch.uint8) if a.size else torch.empty(0, dtype=torch.uint8)
         for r, a in raw.items()}
    try:
        return get_codec(C.ENC_TERNARY if kind == "ternary" else C.ENC_SPARSE).decode(
            t, infos, params, list(range(len(infos))), tdt)
    except cf.StreamCorrupt as e:
        return e


def job(kind, params, infos, raw, tdt) -> device_decode.GroupJob:
    outs = [torch.empty(m.numel, dtype=tdt, device=DEVICE) for m in infos]
    return device_decode.GroupJob(C.ENC_TERNARY if kind == "ternary" else C.ENC_SPARSE, params, infos, raw, tdt, outs)


def same(expected: dict[int, torch.Tensor], j: device_decode.GroupJob) -> bool:
    """Bit for bit, but for NaN, whose bits the spec leaves to the implementation (5.5): a
    damaged value stream can hold one."""
    for i in range(len(j.members)):
        got, want = j.outs[i].cpu(), expected[i].reshape(-1)
        nan = torch.isnan(want)
        if not torch.equal(torch.isnan(got), nan) or not bits_equal(got[~nan], want[~nan]):
            return False
    return True


def test_kernels_are_used():
    k = device_decode.kernels(DEVICE)
    assert k is not None and k.INTERPRETED == (DEVICE == "cpu")


@pytest.mark.parametrize("coding", CODINGS)
@pytest.mark.parametrize("kind", KINDS)
def test_kernels_decode_exactly_as_the_cpu(kind, coding):
    rng = np.random.default_rng(zlib.crc32(f"{kind} {coding}".encode()))
    for trial in range(3):
        group = random_group(rng, kind)
        params, infos, raw = encoded(kind, coding, group)
        for tdt in TARGETS:
            expected = cpu_decode(kind, params, infos, raw, tdt)
            assert isinstance(expected, dict)
            j = job(kind, params, infos, raw, tdt)
            device_decode.decode([j], DEVICE)
            assert same(expected, j), (trial, tdt)
            for i, m in enumerate(group):  # and the reference meaning of the compressed tensors
                assert bits_equal(j.outs[i].cpu(), m.to_dense(tdt).reshape(-1))


def test_many_groups_of_every_kind_decode_in_one_call():
    """Groups of several encodings, codings and dtypes in one call: each batch lays its groups'
    streams end to end, so offsets between groups are exercised."""
    rng = np.random.default_rng(7)
    jobs, expected = [], []
    for g in range(12):
        kind, coding = KINDS[g % len(KINDS)], CODINGS[(g // 2) % 2]
        tdt = TARGETS[(g // 4) % 3]
        params, infos, raw = encoded(kind, coding, random_group(rng, kind))
        expected.append(cpu_decode(kind, params, infos, raw, tdt))
        jobs.append(job(kind, params, infos, raw, tdt))
    device_decode.decode(jobs, DEVICE)
    for e, j in zip(expected, jobs, strict=True):
        assert same(e, j)


def test_a_large_group_spans_many_blocks():
    rng = np.random.default_rng(3)
    for coding in CODINGS:
        group = random_group(rng, "ternary", sizes=[150_000, 3, 70_000])
        params, infos, raw = encoded("ternary", coding, group)
        expected = cpu_decode("ternary", params, infos, raw, torch.float16)
        j = job("ternary", params, infos, raw, torch.float16)
        device_decode.decode([j], DEVICE)
        assert same(expected, j)


def _damage(rng: np.random.Generator, raw: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = {r: a.copy() for r, a in raw.items()}
    roles = [r for r in out if out[r].size or r != C.ROLE_VALUES]
    role = roles[int(rng.integers(len(roles)))]
    a = out[role]
    # the manifest fixes the values stream's length (a file with another is refused before decoding)
    how = rng.choice(["flip", "flip", "flip", "byte"] + ([] if role == C.ROLE_VALUES else ["drop", "append"]))
    if how == "flip" and a.size:
        i = int(rng.integers(8 * a.size))
        a[i // 8] ^= np.uint8(1 << (i % 8))
    elif how == "byte" and a.size:
        a[int(rng.integers(a.size))] = np.uint8(rng.integers(256))
    elif how == "drop" and a.size:
        a = a[:-1]
    else:
        a = np.concatenate([a, np.array([rng.integers(256)], dtype=np.uint8)])
    out[role] = a
    return out


@pytest.mark.parametrize("coding", CODINGS)
@pytest.mark.parametrize("kind", ["ternary", "sparse-float16"])
def test_damaged_streams_are_refused_or_decoded_as_the_cpu_does(kind, coding):
    """A changed bit either still decodes (both decoders give the same tensors) or is refused by
    both with ``StreamCorrupt``; a damaged group among valid ones fails the whole call."""
    rng = np.random.default_rng(zlib.crc32(f"{kind} {coding} damage".encode()))
    refused = accepted = 0
    for _ in range(30):
        group = random_group(rng, kind, sizes=[int(rng.integers(1, 900)) for _ in range(int(rng.integers(1, 4)))])
        params, infos, raw = encoded(kind, coding, group)
        bad = _damage(rng, raw)
        tdt = TARGETS[int(rng.integers(3))]
        expected = cpu_decode(kind, params, infos, bad, tdt)
        good_params, good_infos, good_raw = encoded(kind, coding, random_group(rng, kind, sizes=[500, 12]))
        jobs = [job(kind, good_params, good_infos, good_raw, tdt), job(kind, params, infos, bad, tdt)]
        if isinstance(expected, cf.StreamCorrupt):
            with pytest.raises(cf.StreamCorrupt):
                device_decode.decode(jobs, DEVICE)
            refused += 1
        else:
            device_decode.decode(jobs, DEVICE)
            assert same(expected, jobs[1])
            accepted += 1
    assert refused >= 5 and accepted >= 1  # both outcomes were exercised


def test_nan_values_stay_nan():
    vals = torch.tensor([float("nan"), -float("nan"), 1.0], dtype=torch.float32)
    group = [cf.CompressedTensor.sparse("w", (5,), "float16", np.array([0, 2, 4]), vals, offset=0.5)]
    for tdt in TARGETS:
        params, infos, raw = encoded("sparse-float32", C.POSITIONS_GOLOMB, group)
        j = job("sparse-float32", params, infos, raw, tdt)
        device_decode.decode([j], DEVICE)
        out = j.outs[0].cpu().float()
        assert torch.isnan(out[[0, 2]]).all() and out[[1, 3, 4]].tolist() == [0.5, 0.5, 1.5]


# -- files ----------------------------------------------------------------------------------------
def _state_dict(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"base_model.model.layers.{i}.q_proj.lora_{ab}.weight": torch.randn(*shape, generator=g)
            for i in range(3) for ab, shape in (("A", (8, 96)), ("B", (96, 8)))} | {"scale": torch.randn(5, generator=g)}


def _files(tmp_path) -> list:
    paths = []
    for n, (mode, positions, density) in enumerate([("ternary", "golomb", 0.1), ("prune", "bitmap", 0.5),
                                                     ("ternary", "auto", 0.6), ("prune", "golomb", 0.05)]):
        ca = cf.compress(_state_dict(n), density=density, mode=mode, min_sparse_numel=8)
        p = tmp_path / f"a{n}.cpeft.safetensors"
        cf.save(ca, p, options=cf.WriterOptions(positions=positions))
        paths.append(p)
    return paths


def test_load_on_the_device_equals_load_on_the_cpu(tmp_path, monkeypatch):
    for p in _files(tmp_path):
        for dtype in (None, "bfloat16"):
            monkeypatch.setenv(device_decode.ENV_KERNELS, "torch")
            expected = cf.load(p, dtype=dtype)
            monkeypatch.setenv(device_decode.ENV_KERNELS, "triton")
            got = cf.load(p, dtype=dtype, device=DEVICE)
            assert list(got) == list(expected)
            for name in expected:
                assert got[name].device.type == DEVICE and bits_equal(got[name].cpu(), expected[name]), name


def test_load_many_decodes_every_file_with_its_own_memory(tmp_path):
    paths = _files(tmp_path)
    got = cf.load_many(paths, dtype="float16", device=DEVICE)
    assert len(got) == len(paths)
    storages = []
    for p, sd in zip(paths, got, strict=True):
        expected = cf.load(p, dtype="float16")
        assert list(sd) == list(expected)
        assert all(bits_equal(sd[n].cpu(), expected[n]) for n in expected)
        storages.append({t.untyped_storage().data_ptr() for t in sd.values()})
    for a in range(len(storages)):  # no file's tensors share memory with another file's
        for b in range(a + 1, len(storages)):
            assert not storages[a] & storages[b]


def test_load_many_checks_every_digest_before_decoding(tmp_path):
    paths = _files(tmp_path)
    with cf.open_file(paths[2]) as f:
        info = next(iter(f.manifest.groups[0].streams.values()))
        start = f._file.data_start + f._file.header[info.name]["data_offsets"][0]
    data = bytearray(paths[2].read_bytes())
    data[start] ^= 1
    paths[2].write_bytes(bytes(data))
    with pytest.raises(cf.StreamDigestMismatch):
        cf.load_many(paths, device=DEVICE)


def test_the_environment_chooses_the_path(monkeypatch):
    monkeypatch.setenv(device_decode.ENV_KERNELS, "torch")
    assert device_decode.kernels(DEVICE) is None
    monkeypatch.setenv(device_decode.ENV_KERNELS, "auto")
    assert device_decode.kernels("cpu") is None  # the C extension decodes on the CPU
    assert device_decode.kernels("meta") is None
    monkeypatch.setenv(device_decode.ENV_KERNELS, "gpu")
    with pytest.raises(cf.InvalidArgument, match="COMPEFT_KERNELS"):
        device_decode.kernels(DEVICE)


def _with(raw: dict[str, np.ndarray], role: str, change) -> dict[str, np.ndarray]:
    out = {r: a.copy() for r, a in raw.items()}
    out[role] = change(out[role].copy())
    return out


def _set_bit(a: np.ndarray, i: int) -> np.ndarray:
    a[i // 8] |= np.uint8(1 << (i % 8))
    return a


ZERO = np.zeros(1, dtype=np.uint8)
TARGETED = {
    # Golomb: a zero byte after the last code, or after the extra bits; the last code cut short
    "unary trailing byte": (C.POSITIONS_GOLOMB, C.ROLE_UNARY, lambda a: np.concatenate([a, ZERO])),
    "unary cut short": (C.POSITIONS_GOLOMB, C.ROLE_UNARY, lambda a: a[:-1]),
    "extra trailing byte": (C.POSITIONS_GOLOMB, C.ROLE_EXTRA, lambda a: np.concatenate([a, ZERO])),
    "remainders one byte long": (C.POSITIONS_GOLOMB, C.ROLE_REMAINDERS, lambda a: np.concatenate([a, ZERO])),
    "a gap past the tensor's end": (C.POSITIONS_GOLOMB, C.ROLE_UNARY, lambda a: np.concatenate([np.zeros(2000, np.uint8), a])),
    # bit-plane: a padding bit, a missing byte, one entry more than declared
    "plane padding bit": (C.POSITIONS_BITMAP, C.ROLE_POSITIONS, lambda a: _set_bit(a, 8 * a.size - 1)),
    "plane one byte short": (C.POSITIONS_BITMAP, C.ROLE_POSITIONS, lambda a: a[:-1]),
    "plane one entry more": (C.POSITIONS_BITMAP, C.ROLE_POSITIONS, lambda a: a | np.uint8(1)),
    "signs one byte short": (C.POSITIONS_BITMAP, C.ROLE_SIGNS, lambda a: a[:-1]),
}


@pytest.mark.parametrize("damage", list(TARGETED))
def test_each_check_refuses_its_damage(damage):
    coding, role, change = TARGETED[damage]
    rng = np.random.default_rng(11)
    # 2001 elements (the plane's last byte has padding bits), 10% kept: m = 6, so some remainders
    # take an extra bit
    idx = np.sort(rng.choice(2001, size=200, replace=False))
    group = [cf.CompressedTensor.ternary("w", (2001,), "float16", idx, rng.random(200) < 0.5, 0.5)]
    params, infos, raw = encoded("ternary", coding, group)
    assert coding == C.POSITIONS_BITMAP or (raw[C.ROLE_EXTRA].size and raw[C.ROLE_REMAINDERS].size)
    bad = _with(raw, role, change)
    assert isinstance(cpu_decode("ternary", params, infos, bad, torch.float16), cf.StreamCorrupt)
    with pytest.raises(cf.StreamCorrupt):
        device_decode.decode([job("ternary", params, infos, bad, torch.float16)], DEVICE)


def test_the_device_benchmark_runs(tmp_path):
    """``tools/bench_device.py`` measures on a GPU; ``--quick`` on the CPU runs every section in
    the interpreter, so the script a GPU session relies on is known to work."""
    import json
    import subprocess
    import sys

    from conftest import ROOT

    r = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_device.py"), "--device", "cpu", "--quick",
                        "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "bench_device.json").read_text())
    assert len(res["decode"]) == 12 and len(res["batched"]) == 2
    assert all(row["kernels"]["best_s"] > 0 for row in res["decode"] + res["batched"])
    assert res["ready"]["compeft_file_bytes"] < res["ready"]["fp16_folder_bytes"]
    assert "| over 100 Mbit/s |" in (tmp_path / "bench_device.md").read_text()


def test_byte_counts_past_two_to_the_28_do_not_wrap():
    """A stream length is passed to the kernels as a 32-bit integer below 2**31; its bit count
    (eight times more) is not computed in 32 bits, where 2**28 bytes would wrap to a negative
    number of bits and leave every element unwritten without an error."""
    k = device_decode.kernels(DEVICE)
    numel = 8192
    infos = [TensorInfo("w", (numel,), "float16", 0, 0.5, 0.0, group=0)]
    raw = {C.ROLE_POSITIONS: np.zeros(numel // 8, np.uint8), C.ROLE_SIGNS: np.zeros(0, np.uint8)}
    j = job("ternary", {"positions": C.POSITIONS_BITMAP}, infos, raw, torch.float16)
    plan = device_decode.Plan([j], DEVICE)
    b = plan.batches[0]
    (plane, nbytes), = b.streams
    for declared in (nbytes, 1 << 28):  # one block of a plane that claims 256 MiB
        j.outs[0].view(torch.int16).fill_(0x5A5A)
        err = torch.zeros(1, dtype=torch.int32, device=DEVICE)
        base = torch.zeros(1, dtype=torch.int64, device=DEVICE)
        const = {**b.const, "BLOCK": 8192}
        k.bitmap_decode[(1,)](plane, declared, base, 0, b.tab, len(b.rows), b.signs, b.nsigns, b.values, err, **const)
        assert int((j.outs[0].view(torch.int16) != 0x5A5A).sum()) == numel
    ones = torch.zeros(1024, dtype=torch.uint8, device=DEVICE)
    ones[0] = 0xFF
    for declared in (1024, 1 << 28):
        ends = torch.full((8,), -1, dtype=torch.int64, device=DEVICE)
        k.compact_ones[(1,)](ones, declared, torch.zeros(1, dtype=torch.int64, device=DEVICE), ends, 8, BLOCK=8192)
        assert ends.tolist() == list(range(8))


def test_outputs_must_be_exactly_the_members():
    rng = np.random.default_rng(5)
    params, infos, raw = encoded("ternary", C.POSITIONS_GOLOMB, random_group(rng, "ternary", sizes=[64, 16]))
    for bad in (lambda m: torch.empty(m.numel // 2, dtype=torch.float16, device=DEVICE),
                lambda m: torch.empty(2 * m.numel, dtype=torch.float16, device=DEVICE)[::2],
                lambda m: torch.empty(m.numel, dtype=torch.float32, device=DEVICE)):
        j = device_decode.GroupJob(C.ENC_TERNARY, params, infos, raw, torch.float16, [bad(m) for m in infos])
        with pytest.raises(cf.InvalidArgument, match="contiguous tensor of"):
            device_decode.decode([j], DEVICE)


def test_the_first_damaged_group_in_order_is_the_one_reported():
    """A group the kernels refuse comes before one whose stream length is wrong (a host check):
    the error is the first group's, as the CPU decoders report it."""
    rng = np.random.default_rng(9)
    params, infos, raw = encoded("ternary", C.POSITIONS_BITMAP, random_group(rng, "ternary", sizes=[300]))
    moved = _with(raw, C.ROLE_POSITIONS, lambda a: a | np.uint8(0xFF))  # more entries than declared
    short = _with(raw, C.ROLE_SIGNS, lambda a: a[:-1])
    first = cpu_decode("ternary", params, infos, moved, torch.float16)
    assert isinstance(first, cf.StreamCorrupt)
    jobs = [job("ternary", params, infos, moved, torch.float16), job("ternary", params, infos, short, torch.float16)]
    with pytest.raises(cf.StreamCorrupt) as e:
        device_decode.decode(jobs, DEVICE)
    assert str(e.value) == str(first)
