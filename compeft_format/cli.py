"""``compeft`` command line. Every failure is one line ``<path or command>: <CODE>: <reason>`` on
stderr and a non-zero exit; no tracebacks for bad input."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import constants as C
from ._version import __version__
from .errors import CompeftError, InvalidArgument, IOFailure

if TYPE_CHECKING:
    from . import binding
    from .compress import CompeftConfig

# The library's modules (and torch) are imported by the commands that use them, so that
# ``compeft --help`` and the commands that need no tensors start at once.

#: ``--fingerprint`` choices: the algorithm each names
FINGERPRINTS = {"stored": C.FINGERPRINT_ALGORITHM, "float32": C.FINGERPRINT_ALGORITHM_F32}


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="compeft", description="Compress, check and inspect fine-tuned adapters.")
    p.add_argument("--version", action="version", version=f"compeft {__version__} (format {C.FORMAT_VERSION})")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compress", help="compress a PEFT adapter folder or a .safetensors state dict (or a folder "
                                        "of them)")
    c.add_argument("src", help="PEFT adapter folder, .safetensors file, or a fine-tuned model (folder or sharded "
                               "index; with --reference); a folder of several adapters compresses them all")
    c.add_argument("-o", "--output", required=True,
                   help="output file (.cpeft.safetensors); a folder when SRC holds several adapters")
    c.add_argument("--force", action="store_true", help="replace the output file when it exists")
    c.add_argument("--jobs", type=int, default=None, metavar="N",
                   help="a folder of several adapters: compress N at a time (default: one per CPU)")
    c.add_argument("--quiet", action="store_true", help="no progress bar (it shows on a terminal only)")
    c.add_argument("--created-at", default=None, metavar="TIME",
                   help="the time to record as made, YYYY-MM-DDTHH:MM:SSZ (default: now, or SOURCE_DATE_EPOCH when "
                        "set), for files that are the same byte for byte from run to run"),
    c.add_argument("--method", choices=sorted((C.METHOD_FIT, C.METHOD_PAPER)), default=C.METHOD_FIT,
                   help="fit (default): balanced LoRA factors and least-squares scales, no data needed; "
                        "paper: ComPEFT exactly as published (one scale alpha * sigma; choose alpha with --calibrate)")
    c.add_argument("--density", type=_number, default=C.DEFAULT_DENSITY,
                   help=f"fraction of entries kept, in (0, 1] (default {C.DEFAULT_DENSITY})")
    c.add_argument("--alpha", type=_number, default=1.0,
                   help="multiplier of every scale (of sigma with --method paper; 1 is the fit otherwise)")
    c.add_argument("--balance", choices=C.BALANCES, default=None, help="override the method's LoRA factor balancing")
    c.add_argument("--scale", choices=C.SCALES, default=None, help="override the method's scales")
    c.add_argument("--refit", action=argparse.BooleanOptionalAction, default=None,
                   help="override whether lora_B is refitted to the ternarised lora_A")
    c.add_argument("--calibrate", default=None, metavar="MODEL",
                   help="choose alpha by the loss of this local base model (a transformers folder) on --data")
    c.add_argument("--data", default=None, metavar="FILE",
                   help="calibration text for --calibrate: .jsonl (objects with 'text') or plain text")
    c.add_argument("--max-bytes", type=int, default=None, metavar="N",
                   help="with --calibrate: also choose the density, among files of at most N bytes")
    c.add_argument("--alphas", default=None, metavar="A,B,...", help="alpha grid for --calibrate")
    c.add_argument("--max-samples", type=int, default=64, help="calibration samples used (default 64)")
    c.add_argument("--seq-len", type=int, default=256, help="tokens per calibration sample (default 256)")
    c.add_argument("--json", action="store_true", help="print the result, fidelity per module included, as JSON")
    c.add_argument("--scope", choices=C.SCOPES, default=C.SCOPE_GLOBAL, help="top-k and scale over all tensors or per tensor")
    c.add_argument("--mode", choices=C.MODES, default=C.MODE_TERNARY, help="ternary (ComPEFT) or prune (keep values)")
    c.add_argument("--reference", default=None,
                   help="zero, ones, or the weights a full fine-tune started from (a .safetensors file, a model "
                        "folder or a sharded index: the file then stores the deltas); default from peft_type "
                        "(LoRA zero, IA3 ones); required for a model's weights")
    c.add_argument("--dtype", choices=C.FLOAT_DTYPES, default=None, help="dtype tensors decode to (default: source dtype)")
    c.add_argument("--keep-dense", action="append", default=[], metavar="GLOB",
                   help="also keep tensors matching this name pattern dense (repeatable)")
    c.add_argument("--min-sparse-numel", type=int, default=C.DEFAULT_MIN_SPARSE_NUMEL,
                   help="tensors with fewer elements stay dense")
    c.add_argument("--base-model", default=None, metavar="ID",
                   help="base model id (default without --base-weights: the PEFT config's)")
    c.add_argument("--base-revision", default=None, metavar="REV", help="base model revision")
    c.add_argument("--base-weights", default=None, metavar="PATH",
                   help="record the fingerprint of these base weights: a safetensors checkpoint (a file, or a "
                        "folder with model.safetensors or a sharded index)")
    c.add_argument("--fingerprint", choices=sorted(FINGERPRINTS), default="stored",
                   help="fingerprint of the weights as stored (default) or of their values as float32, which "
                        "also matches copies of the base in another float dtype")
    c.add_argument("--positions", choices=("auto", *sorted(C.POSITION_CODINGS)), default="auto",
                   help="position coding: golomb (near the information bound), bitmap (one bit per element) or "
                        "auto (the smaller file for groups of up to 1M elements; larger ones golomb, bitmap for "
                        "tensors that keep more than 40%% of their entries)")
    c.add_argument("--zstd-level", type=int, choices=range(1, 23), default=C.DEFAULT_ZSTD_LEVEL,
                   metavar="1..22", help="zstd level for streams that zstd shrinks")
    c.add_argument("--tensor-digests", action="store_true",
                   help="also record the sha256 of each decoded tensor (32 bytes per tensor)")

    d = sub.add_parser("decompress", help="turn a compeft file back into a PEFT adapter folder (or one .safetensors)")
    d.add_argument("src")
    d.add_argument("-o", "--output", required=True,
                   help="output folder (absent or empty, or --force); a name ending in .safetensors writes the "
                        "tensors to that one file")
    d.add_argument("--dtype", choices=C.FLOAT_DTYPES, default=None, help="dtype of the written tensors")
    d.add_argument("--force", action="store_true", help="replace an existing output folder (nothing of it is kept)")
    d.add_argument("--json", action="store_true", help="print the files written as JSON")

    mg = sub.add_parser("merge", help="merge adapters (compressed files or PEFT folders) into one compressed file")
    mg.add_argument("sources", nargs="+", metavar="ADAPTER", help="two or more: all LoRA or all (IA)3, one base")
    mg.add_argument("-o", "--output", required=True, help="the merged file (.cpeft.safetensors)")
    mg.add_argument("--method", choices=("task-arithmetic", "ties", "dare"), default="task-arithmetic",
                    help="how the updates combine (default task-arithmetic: their weighted sum, exactly)")
    mg.add_argument("--weights", default=None, metavar="W1,W2,...",
                    help="one per adapter (default 1 each): task arithmetic and DARE scale each update by it, TIES "
                         "weighs each in its sign election and mean")
    mg.add_argument("--keep", type=_number, default=0.2, metavar="F",
                    help="TIES: the fraction of each update kept by magnitude; DARE: the chance each entry is kept "
                         "(default 0.2)")
    mg.add_argument("--rank", type=int, default=None,
                    help="TIES and DARE: rank of the merged LoRA (default the sum of the ranks)")
    mg.add_argument("--seed", type=int, default=0, help="DARE's random drops")
    mg.add_argument("--density", type=_number, default=C.DEFAULT_DENSITY,
                    help=f"ComPEFT density of the merged file (default {C.DEFAULT_DENSITY}; 1 with --mode prune "
                         "keeps every value)")
    mg.add_argument("--mode", choices=C.MODES, default=C.MODE_TERNARY)
    mg.add_argument("--any-base", action="store_true",
                    help="merge adapters whose recorded base models have different names (the same model saved "
                         "under two names); base fingerprints that differ are refused all the same")
    mg.add_argument("--created-at", default=None, metavar="TIME",
                    help="the time the file records as made, YYYY-MM-DDTHH:MM:SSZ (default now, or "
                         "SOURCE_DATE_EPOCH)")
    mg.add_argument("--quiet", action="store_true", help="no notes on stderr")
    mg.add_argument("--force", action="store_true", help="replace the output file when it exists")
    mg.add_argument("--json", action="store_true", help="print the result as JSON")

    ad = sub.add_parser("apply-delta", help="rebuild a full fine-tune: a base model folder plus a file's deltas")
    ad.add_argument("file", help="a compeft file of deltas (compress --reference BASE)")
    ad.add_argument("--base", required=True, metavar="MODEL",
                    help="the model it was fine-tuned from: a folder (model.safetensors or a sharded index)")
    ad.add_argument("-o", "--output", required=True, help="the model folder to write (absent or empty, or --force)")
    ad.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    ad.add_argument("--force", action="store_true", help="replace an existing output folder")
    ad.add_argument("--no-check-base", action="store_true",
                    help="skip comparing the base fingerprint the file records with --base")
    ad.add_argument("--json", action="store_true")

    v = sub.add_parser("validate", aliases=["verify"], help="check files fully; exit 0 when all are valid")
    v.add_argument("files", nargs="+", help="files, or Hub repositories (namespace/name[@rev], hf://...)")
    v.add_argument("--json", action="store_true", help="one JSON object per file")
    v.add_argument("--key", action="append", default=None, metavar="KEY.pub",
                   help="also require each file's signature (FILE.sig) by this public key; repeat to trust several")

    kg = sub.add_parser("keygen", help="create an Ed25519 key pair for signing (KEY, mode 0600, and KEY.pub)")
    kg.add_argument("-o", "--output", required=True, metavar="KEY", help="private key file; never overwritten")
    kg.add_argument("--json", action="store_true")

    sg = sub.add_parser("sign", help="verify files and write their signatures (FILE.sig)")
    sg.add_argument("files", nargs="+", metavar="FILE")
    sg.add_argument("--key", required=True, metavar="KEY", help="private key (from compeft keygen)")
    sg.add_argument("--force", action="store_true", help="replace a signature there by another key")
    sg.add_argument("--json", action="store_true", help="one JSON object per file")

    i = sub.add_parser("inspect", help="show tensors, encodings, sizes and ratios; exit 1 if a file is not valid")
    i.add_argument("files", nargs="+", metavar="FILE", help="files, or Hub repositories (namespace/name[@rev], hf://...)")
    i.add_argument("--json", action="store_true", help="a JSON object per file (a list for several files)")

    pu = sub.add_parser("push", help="upload compressed file(s) to a Hub repository in one commit")
    pu.add_argument("files", nargs="+", metavar="FILE")
    pu.add_argument("repo", metavar="NAMESPACE/NAME")
    pu.add_argument("--revision", default=None, help="branch to commit to (created when missing)")
    pu.add_argument("--private", action="store_true")
    pu.add_argument("--message", default=None, help="commit message")
    pu.add_argument("--endpoint", default=None, help="Hub URL (default: HF_ENDPOINT or huggingface.co)")
    pu.add_argument("--token", default=None, help="access token (default: HF_TOKEN or the stored login)")
    pu.add_argument("--json", action="store_true")

    pl = sub.add_parser("pull", help="download a compeft repository, checking every byte")
    pl.add_argument("repo", metavar="NAMESPACE/NAME[@REVISION]")
    pl.add_argument("-o", "--output", default=None, help="folder for the verified files")
    pl.add_argument("--to-peft", action="store_true", help="write PEFT adapter folder(s) instead of the files")
    pl.add_argument("--force", action="store_true",
                    help="replace files in -o that an earlier pull did not write (an update of one replaces them)")
    pl.add_argument("--base-model", default=None, metavar="ID", help="refuse artifacts made for another base model id")
    pl.add_argument("--base", default=None, metavar="PATH",
                    help="refuse artifacts not bound to these base weights (a safetensors checkpoint)")
    pl.add_argument("--endpoint", default=None)
    pl.add_argument("--token", default=None)
    pl.add_argument("--cache-dir", default=None)
    pl.add_argument("--require-signature", action="append", default=None, metavar="KEY.pub",
                    help="refuse artifacts not signed by this public key; repeat to trust several")
    pl.add_argument("--json", action="store_true")

    cb = sub.add_parser("check-base", help="check that a file was made for the given base weights")
    cb.add_argument("file")
    cb.add_argument("model", metavar="MODEL", help="a safetensors checkpoint: a file, or a folder with "
                                                   "model.safetensors or a sharded index")
    cb.add_argument("--json", action="store_true")

    h = sub.add_parser("hub", help="run a local Hub-compatible server")
    hs = h.add_subparsers(dest="hub_command", required=True)
    sv = hs.add_parser("serve", help="serve repositories from a folder")
    sv.add_argument("--root", default="./compeft-hub", help="where repositories are stored")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8080)
    sv.add_argument("--token", default=os.environ.get("COMPEFT_HUB_TOKEN"),
                    help="a token that may write every namespace (default: COMPEFT_HUB_TOKEN)")
    sv.add_argument("--tokens", default=None, metavar="FILE",
                    help='JSON {"tokens": {TOKEN: [NAMESPACE, ...]}}: each token writes, and reads the private '
                         'repositories of, its namespaces ("*": all). With neither --token nor --tokens anyone '
                         "may write (see docs/serving.md)")
    sv.add_argument("--user", default="local", help="the namespace whoami reports")
    sv.add_argument("--lfs", action="store_true",
                    help="answer uploadMode lfs for binary files (compeft push falls back from Xet by itself; "
                         "other huggingface_hub clients need HF_HUB_DISABLE_XET=1)")
    sv.add_argument("--max-workers", type=int, default=64,
                    help="connections served at once; more are answered 503 with Retry-After (default 64)")
    sv.add_argument("--timeout", type=float, default=30.0,
                    help="seconds a connection may stay idle or stall before it is closed (default 30)")
    sv.add_argument("--verbose", action="store_true", help="log every request")

    from cpet_adapters.cli import add_parser as add_cpet_parser  # training: cpet_adapters builds on this package

    add_cpet_parser(sub)
    return p


def _binding(a: argparse.Namespace) -> binding.BaseBinding | None:
    """The binding the --base-* options give; None when none is given."""
    from . import binding
    if a.base_model is None and a.base_revision is None and a.base_weights is None:
        return None
    fp = None if a.base_weights is None else binding.fingerprint(a.base_weights, FINGERPRINTS[a.fingerprint])
    return binding.BaseBinding(id=a.base_model, revision=a.base_revision, fingerprint=fp)


def _config(a: argparse.Namespace) -> CompeftConfig:
    from .compress import CompeftConfig
    from .peft_layout import DEFAULT_DENSE_PATTERNS

    overrides = {k: getattr(a, k) for k in ("balance", "scale", "refit") if getattr(a, k) is not None}
    return CompeftConfig.method(
        a.method, density=a.density, alpha=a.alpha, scope=a.scope, mode=a.mode, dtype=a.dtype,
        dense_patterns=DEFAULT_DENSE_PATTERNS + tuple(a.keep_dense), min_sparse_numel=a.min_sparse_numel, **overrides)


def _progress(items: Any, total: int, desc: str = "calibrating", unit: str = "candidate") -> Any:
    """A progress bar on stderr (tqdm, as huggingface_hub shows) when stderr is a terminal."""
    try:
        from tqdm import tqdm  # type: ignore[import-untyped,unused-ignore]
    except ImportError:
        return items
    return tqdm(items, total=total, desc=desc, unit=unit, disable=not sys.stderr.isatty(), file=sys.stderr)


def _calibrate(a: argparse.Namespace, sd: dict[str, Any], config: dict[str, Any] | None,
               cfg: CompeftConfig, **kwargs: Any) -> Any:
    from .calibrate import LossMeter, calibrate, load_causal_lm, read_texts
    from .peft_io import compress_peft
    from .writer import WriterOptions

    if a.data is None:
        raise InvalidArgument("--calibrate needs --data FILE (calibration text)")
    if config is None:
        raise InvalidArgument("--calibrate needs a PEFT adapter folder (its adapter_config.json)")
    alphas = None
    if a.alphas:
        try:
            alphas = [float(x) for x in a.alphas.split(",")]
        except ValueError:
            raise InvalidArgument(f"--alphas must be numbers separated by commas, got {a.alphas!r}") from None
    texts = read_texts(a.data, a.max_samples)
    model, tok = load_causal_lm(a.calibrate)
    meter = LossMeter(model, tok, texts, seq_len=a.seq_len)
    options = WriterOptions(zstd_level=a.zstd_level, tensor_digests=a.tensor_digests, positions=a.positions)
    return calibrate(sd, config, model, meter, cfg, alphas=alphas, max_bytes=a.max_bytes, progress=_progress,
                     writer_options=options,
                     compressor=lambda c: compress_peft(a.src, c, tensors=(sd, config), **kwargs))


def _created_at(text: str | None) -> str | None:
    if text is None:
        return None
    import datetime as dt

    try:
        dt.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ")
    except ValueError:
        raise InvalidArgument(f"--created-at must be YYYY-MM-DDTHH:MM:SSZ (UTC), got {text!r}") from None
    return text


def _ratio(x: float) -> str:
    from .report import ratio_text

    return ratio_text(x, 1)


class _Stages:
    """A progress bar over the stages of one command (tqdm on stderr when it is a terminal and
    ``--quiet`` is not given): the stage in hand is its description."""

    def __init__(self, names: list[str], quiet: bool) -> None:
        from tqdm import tqdm  # type: ignore[import-untyped,unused-ignore]

        self.bar = tqdm(total=len(names), unit="step", file=sys.stderr, disable=quiet or not sys.stderr.isatty(),
                        bar_format="{desc}: {n_fmt}/{total_fmt} [{elapsed}]", leave=False)
        self.started = False

    def __call__(self, name: str) -> None:
        if self.started:
            self.bar.update(1)
        self.started = True
        self.bar.set_description_str(name)

    def close(self) -> None:
        self.bar.close()


def _compress_batch(a: argparse.Namespace, found: dict[str, Path]) -> int:
    """``compress`` of a folder holding several adapters: each into ``-o FOLDER``, a summary table,
    one error line per failure and exit status 1 when any failed."""
    from .batch import compress_many

    names = ", ".join(list(found)[:6]) + (" ..." if len(found) > 6 else "")
    if not found:
        raise InvalidArgument(f"{a.src} holds no adapter (a PEFT folder, a .safetensors file or a model folder)")
    if a.output.endswith(".safetensors"):
        raise InvalidArgument(f"{a.src} holds {len(found)} adapters ({names}): give -o a folder to compress them "
                              "all, or compress one of them")
    if a.calibrate is not None:
        raise InvalidArgument("--calibrate chooses alpha for one adapter: compress the adapters one at a time")
    if a.jobs is not None and a.jobs < 1:
        raise InvalidArgument(f"--jobs must be at least 1, got {a.jobs}")
    reference = a.reference if a.reference not in (C.REFERENCE_ZERO, C.REFERENCE_ONES) else None
    cfg = _config(a).replace(reference=a.reference if reference is None else None)
    writer = {"zstd_level": a.zstd_level, "tensor_digests": a.tensor_digests, "positions": a.positions}
    results = compress_many(found, a.output, cfg, workers=a.jobs, overwrite=a.force, reference=reference,
                            base=_binding(a), created_at=_created_at(a.created_at), writer=writer,
                            progress=None if a.quiet else lambda it, n: _progress(it, n, "compressing", "adapter"))
    failed = [r for r in results if not r.ok]
    if a.json:
        print(json.dumps([r.to_json() for r in results], indent=2))
    else:
        width = max(len(r.name) for r in results)
        print(f"{'adapter':<{width}}  {'params':>12}  {'bytes':>11}  {'vs fp16':>13}  {'rel. error':>10}")
        for r in results:
            if r.ok:
                err = "-" if r.relative_error is None else f"{r.relative_error:.3f}"
                print(f"{r.name:<{width}}  {r.params:>12,}  {r.file_bytes:>11,}  {_ratio(r.ratio_vs_fp16):>13}  "
                      f"{err:>10}")
            else:
                print(f"{r.name:<{width}}  failed: {r.code}")
        print(f"{len(results) - len(failed)} of {len(results)} adapters compressed into {a.output}")
    for r in failed:
        print(f"compeft compress: {r.code}: {r.source}: {r.reason}", file=sys.stderr)
    for r in results:
        if r.ok and r.emptied:
            print(f"compeft compress: warning: {r.name}: {len(r.emptied)} module(s) lost their whole update (they do "
                  f"nothing now): {', '.join(r.emptied[:3])}{' ...' if len(r.emptied) > 3 else ''}", file=sys.stderr)
    return 1 if failed else 0


def _hub_paths(spec: str, *, compeft_only: bool = False) -> list[Path]:
    """Local paths for a command's input: ``spec`` itself, or what the Hub repository it names
    holds, downloaded and checked (``hub.source``; endpoint and token from HF_ENDPOINT, HF_TOKEN):
    a compeft repository's artifacts, or (unless ``compeft_only``) a PEFT adapter."""
    from .hub import source

    ref = source.parse(spec)
    if ref is None:
        return [Path(spec)]
    _quiet_hub_logging()
    return source.artifacts(ref) if compeft_only else source.local(spec)


def cmd_compress(a: argparse.Namespace) -> int:
    sources = _hub_paths(a.src)
    if len(sources) != 1:
        raise InvalidArgument(f"{a.src} holds {len(sources)} compressed artifacts; they are compressed already")
    with _named_as(sources[0], a.src):
        a.src = str(sources[0])
        return _compress(a)


@contextlib.contextmanager
def _named_as(local: Path, spec: str) -> Iterator[None]:
    """Errors about a Hub repository's files name them ``hf://namespace/name@commit/...`` rather
    than by the cache folder they were downloaded into."""
    parts = local.parts
    if spec == str(local) or "snapshots" not in parts[:-1]:
        yield
        return
    i = len(parts) - 1 - parts[::-1].index("snapshots")
    snapshot, commit = str(Path(*parts[: i + 2])), parts[i + 1] if i + 1 < len(parts) else ""
    from .hub import source

    ref = source.parse(spec)
    shown = f"hf://{ref.repo_id}@{commit}" if ref is not None else spec
    try:
        yield
    except CompeftError as e:
        details = {k: v.replace(snapshot, shown) if isinstance(v, str) else v
                   for k, v in vars(e).items() if not k.startswith("_")}
        raise type(e)(e.message.replace(snapshot, shown), **details) from None


def _compress(a: argparse.Namespace) -> int:
    from .batch import several_adapters

    found = several_adapters(a.src)
    if found is not None:
        return _compress_batch(a, found)
    from .fidelity import measure_fidelity
    from .peft_io import check_output, compress_peft, read_checkpoint, read_source
    from .report import inspect
    from .writer import check_name, save

    check_output(a.output, overwrite=a.force, folder=False, inputs=[a.src, *([a.reference] if a.reference else [])])
    check_name(a.output)
    created_at = _created_at(a.created_at)
    if a.max_bytes is not None and a.calibrate is None:
        raise InvalidArgument("--max-bytes needs --calibrate (the density is chosen by the loss)")
    stage = _Stages(["reading", "compressing", "writing", "measuring"], a.quiet or a.calibrate is not None)
    try:
        stage("reading")
        reference: str | dict | None = a.reference
        base_weights = None
        if reference is not None and reference not in (C.REFERENCE_ZERO, C.REFERENCE_ONES):
            reference, base_weights = C.REFERENCE_BASE, read_checkpoint(reference)
        cfg = _config(a).replace(reference=reference)
        sd, config = read_source(a.src)
        calibration = None
        stage("compressing")
        if a.calibrate is not None:
            calibration = _calibrate(a, sd, config, cfg, base=_binding(a), created_at=created_at)
            ca = calibration.adapter
        else:
            ca = compress_peft(a.src, cfg, base_weights=base_weights, base=_binding(a), tensors=(sd, config),
                               created_at=created_at)
        stage("writing")
        manifest = save(ca, a.output, zstd_level=a.zstd_level, tensor_digests=a.tensor_digests,
                        positions=a.positions)
        stage("measuring")
        r = inspect(a.output)
        fid = measure_fidelity(sd, ca, base_weights=base_weights)
    finally:
        stage.close()
    if a.json:
        out = {"path": a.output, "params": r["params"], "file_bytes": r["file_bytes"],
               "bits_per_param": r["bits_per_param"], "ratio_vs_fp16": r["ratio_vs_fp16"],
               "compression": manifest.compression.to_dict(), "fidelity": fid.to_json(),
               "calibration": None if calibration is None else calibration.to_json()}
        print(json.dumps(out, indent=2))
    else:
        bound = "" if manifest.base_model.is_empty else f"; base {manifest.base_model.describe()}"
        worst = fid.worst(1)
        error = "" if not worst else (f"; relative error of the weight update {fid.relative_error:.3f} (worst module "
                                      f"{worst[0].relative_error:.3f})")
        print(f"{a.output}: {r['params']:,} params, {r['file_bytes']:,} bytes, {r['bits_per_param']:.3f} bits/param, "
              f"{_ratio(r['ratio_vs_fp16'])} than fp16, {_ratio(r['ratio_vs_fp32'])} than fp32{bound}{error}")
        if calibration is not None:
            kept = calibration.gain_kept
            print(f"  calibrated: density {ca.compression.density:g}, alpha {ca.compression.alpha:g}, loss "
                  f"{calibration.loss:.4f} (base model {calibration.base_loss:.4f}, uncompressed adapter "
                  f"{calibration.adapter_loss:.4f}" + ("" if kept is None else f"; {kept:.0%} of its loss gain kept")
                  + ")")
    if fid.emptied:
        shown = ", ".join(fid.emptied[:5]) + (f" and {len(fid.emptied) - 5} more" if len(fid.emptied) > 5 else "")
        print(f"compeft compress: warning: {len(fid.emptied)} of {len(fid.modules)} module(s) lost their whole "
              f"update (they do nothing now): {shown}", file=sys.stderr)
    return 0


def _wrote(a: argparse.Namespace, written: Sequence[Path]) -> int:
    """What a command that writes a folder or a file prints: the files written."""
    if a.json:
        print(json.dumps({"path": a.output, "files": [str(p) for p in written]}))
    else:
        print(f"{a.output}: wrote {', '.join(p.name for p in written)}")
    return 0


def cmd_decompress(a: argparse.Namespace) -> int:
    from .peft_io import decompress_to_file, decompress_to_peft

    if a.output.endswith(".safetensors"):
        written = [decompress_to_file(a.src, a.output, dtype=a.dtype, overwrite=a.force)]
    else:
        written = decompress_to_peft(a.src, a.output, dtype=a.dtype, overwrite=a.force)
    return _wrote(a, written)


def cmd_merge(a: argparse.Namespace) -> int:
    from .compress import compress
    from .merge import merge
    from .peft_io import check_output
    from .report import inspect
    from .writer import check_name, save

    check_output(a.output, overwrite=a.force, folder=False, inputs=a.sources)
    check_name(a.output)
    weights = None
    if a.weights is not None:
        try:
            weights = [float(x) for x in a.weights.split(",")]
        except ValueError:
            raise InvalidArgument(f"--weights must be numbers separated by commas, got {a.weights!r}") from None
    if not (0 < a.keep <= 1):
        raise InvalidArgument(f"--keep must be in (0, 1], got {a.keep:g}")
    from .batch import several_adapters

    notes = []
    for src in a.sources:
        others = several_adapters(src) if Path(src).is_dir() else None
        if others is not None and "default" in others:
            rest = [n for n in others if n != "default"]
            notes.append(f"compeft merge: note: {src} holds {len(rest)} more adapter(s) in sub-folders "
                         f"({', '.join(rest[:3])}{' ...' if len(rest) > 3 else ''}); its top adapter is merged, as "
                         "peft loads it")
    created_at = _created_at(a.created_at)
    sd, config, base = merge(a.sources, method=a.method, weights=weights, density=a.keep, rank=a.rank, seed=a.seed,
                             any_base=a.any_base)
    ca = compress(sd, peft_config=config, base=base, density=a.density, mode=a.mode, created_at=created_at,
                  source=f"merge ({a.method}) of " + ", ".join(Path(s).name for s in a.sources))
    save(ca, a.output)
    r = inspect(a.output)
    for note in [] if a.quiet else notes:
        print(note, file=sys.stderr)
    if a.json:
        print(json.dumps({"path": a.output, "method": a.method, "sources": a.sources, "params": r["params"],
                          "file_bytes": r["file_bytes"], "rank": config.get("r")}))
    else:
        print(f"{a.output}: {a.method} of {len(a.sources)} adapters, {r['params']:,} params, {r['file_bytes']:,} "
              f"bytes")
    return 0


def cmd_apply_delta(a: argparse.Namespace) -> int:
    from .delta import apply_delta

    written = apply_delta(a.file, a.base, a.output, overwrite=a.force, max_shard_size=a.max_shard_size,
                          check_base=not a.no_check_base)
    return _wrote(a, written)


def _expand(specs: list[str]) -> list[tuple[str, CompeftError | None]]:
    """Each file as given, or the verified artifacts of each Hub repository named; a repository
    that cannot be read stands for itself with its error."""
    out: list[tuple[str, CompeftError | None]] = []
    for spec in specs:
        try:
            out += [(str(p), None) for p in _hub_paths(spec, compeft_only=True)]
        except CompeftError as e:
            out.append((spec, e))
    return out


def _warn_name(command: str, path: str) -> None:
    """A valid compeft file under a name peft loads by itself: peft would run the base model."""
    from .writer import foreign_name

    if foreign_name(path):
        print(f"compeft {command}: warning: {path} is named as the weights peft or transformers load by themselves, "
              "and they cannot read a compeft file (peft would run the base model): rename it to "
              "NAME.cpeft.safetensors", file=sys.stderr)


def cmd_validate(a: argparse.Namespace) -> int:
    from . import signing
    from .reader import CompeftFile

    keys = None if a.key is None else signing.trusted_keys(a.key)
    bad = 0
    for path, failed in _expand(a.files):
        try:
            if failed is not None:
                raise failed
            signer = None
            if keys is None:
                with CompeftFile(path) as f:
                    f.verify()
            else:
                signer = signing.verify_signed(path, keys).key_fingerprint
            result: dict[str, Any] = {"path": path, "valid": True, **({} if signer is None else {"signed_by": signer})}
            line = f"{path}: OK" + ("" if signer is None else f", signed by key {signer}")
            _warn_name("validate", path)
        except CompeftError as e:
            bad += 1
            result = {"path": path, "valid": False, "code": e.code, "reason": str(e)}
            line = f"{path}: INVALID {e.code}: {e}"
        except OSError as e:
            bad += 1
            result = {"path": path, "valid": False, "code": IOFailure.code, "reason": e.strerror or str(e)}
            line = f"{path}: INVALID {IOFailure.code}: {result['reason']}"
        print(json.dumps(result) if a.json else line, flush=False)
    sys.stdout.flush()
    return 1 if bad else 0


def cmd_keygen(a: argparse.Namespace) -> int:
    from . import signing

    private, public = signing.generate_keys(a.output)
    fingerprint = signing.key_fingerprint(signing.load_public_key(public))
    if a.json:
        print(json.dumps({"private_key": str(private), "public_key": str(public), "fingerprint": fingerprint}))
    else:
        print(f"{private}: private key (keep it secret)")
        print(f"{public}: public key {fingerprint}")
    return 0


def cmd_sign(a: argparse.Namespace) -> int:
    from . import signing

    key = signing.load_private_key(a.key)
    for path in a.files:
        dest = signing.sign(path, key, overwrite=a.force)
        fingerprint = signing.key_fingerprint(key)
        print(json.dumps({"path": path, "signature": str(dest), "signed_by": fingerprint}) if a.json
              else f"{dest}: {path} signed by key {fingerprint}")
    return 0


def cmd_check_base(a: argparse.Namespace) -> int:
    from . import binding
    from .reader import CompeftFile

    with CompeftFile(a.file) as f:
        recorded = f.manifest.base_model
    binding.check(recorded, a.model, require=True, subject=a.file)
    print(json.dumps({"path": a.file, "model": a.model, "base_model": recorded.to_json()}) if a.json
          else f"{a.file}: {a.model} is its base ({recorded.describe()})")
    return 0


def cmd_inspect(a: argparse.Namespace) -> int:
    """Each file's report, after a full check of the file: a file that does not verify is named
    with its error (and the others are still shown), and the exit status is 1."""
    from .reader import verify
    from .report import format_report, inspect

    reports: list[dict[str, Any]] = []
    bad = 0
    for path, failed in _expand(a.files):
        try:
            if failed is not None:
                raise failed
            r = inspect(path)
            verify(path)
            r["valid"] = True
            _warn_name("inspect", path)
        except CompeftError as e:
            bad += 1
            r = {"path": path, "valid": False, "code": e.code, "reason": str(e)}
        except OSError as e:
            bad += 1
            r = {"path": path, "valid": False, "code": IOFailure.code, "reason": e.strerror or str(e)}
        reports.append(r)
        if not a.json:
            if r["valid"]:
                print(format_report(r))
            else:  # the CLI's one line for a failure, and the next file
                print(f"compeft inspect: {r['code']}: {path}: {r['reason']}", file=sys.stderr)
    if a.json:
        print(json.dumps(reports[0] if len(reports) == 1 else reports, indent=2))
    return 1 if bad else 0


def _quiet_hub_logging() -> None:
    """The CLI reports failures itself, on one line; huggingface_hub's warnings would add more."""
    from huggingface_hub.utils import disable_progress_bars
    from huggingface_hub.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    if not sys.stderr.isatty():  # progress bars are for people watching a terminal
        disable_progress_bars()


def cmd_push(a: argparse.Namespace) -> int:
    from .hub.client import push

    _quiet_hub_logging()
    r = push(a.files, a.repo, revision=a.revision, private=a.private, message=a.message,
             endpoint=a.endpoint, token=a.token)
    print(json.dumps({"repo": r.repo_id, "commit": r.commit, "files": list(r.files)}) if a.json
          else f"{r.repo_id}: pushed {', '.join(r.files)} in commit {r.commit}")
    return 0


def cmd_pull(a: argparse.Namespace) -> int:
    from .hub.client import pull

    if a.to_peft and a.output is None:
        raise InvalidArgument("--to-peft writes PEFT adapter folders into -o FOLDER; give one")
    _quiet_hub_logging()
    r = pull(a.repo, local_dir=a.output, to_peft=a.to_peft, base_model=a.base_model, base=a.base,
             require_signature=a.require_signature, endpoint=a.endpoint, token=a.token, cache_dir=a.cache_dir,
             overwrite=a.force)
    if a.json:
        print(json.dumps({"repo": r.repo_id, "commit": r.commit, "files": [
            {"path": str(p), "artifact": art.path, "sha256": art.sha256, "signed_by": r.signers.get(art.path)}
            for p, art in zip(r.paths, r.index.artifacts, strict=True)]}))
        return 0
    for p, art in zip(r.paths, r.index.artifacts, strict=True):
        signer = r.signers.get(art.path)
        print(f"{p}: verified ({r.repo_id}@{r.commit[:12]})" + ("" if signer is None else f", signed by key {signer}"))
    return 0


def cmd_hub(a: argparse.Namespace) -> int:
    from .hub.server import TokenTable, make_server

    if a.max_workers < 1 or not a.timeout > 0:
        raise InvalidArgument("--max-workers must be >= 1 and --timeout > 0")
    if not 0 <= a.port <= 65535:
        raise InvalidArgument(f"--port must be from 0 to 65535 (0: any free port), got {a.port}")
    tokens = None if a.tokens is None else TokenTable.load(a.tokens)
    server = make_server(a.root, host=a.host, port=a.port, token=a.token, user=a.user, lfs=a.lfs,
                         verbose=a.verbose, max_workers=a.max_workers, timeout=a.timeout, tokens=tokens)
    host, port = str(server.server_address[0]), int(server.server_address[1])
    writes = "are open to anyone" if server.access is None else f"need one of {len(server.access)} token(s)"
    print(f"compeft hub serving {Path(a.root).resolve()} on http://{host}:{port} "
          f"(writes {writes}); Ctrl-C stops", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
    return 0


COMMANDS = {"compress": cmd_compress, "decompress": cmd_decompress, "apply-delta": cmd_apply_delta, "merge": cmd_merge, "validate": cmd_validate, "inspect": cmd_inspect,
            "check-base": cmd_check_base, "push": cmd_push, "pull": cmd_pull, "hub": cmd_hub,
            "verify": cmd_validate, "keygen": cmd_keygen, "sign": cmd_sign}


def cmd_cpet(a: argparse.Namespace) -> int:
    from cpet_adapters.cli import run

    return run(a)


COMMANDS["cpet"] = cmd_cpet


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # the command as typed, sub-command included ("hub serve")
    name = " ".join(str(v) for v in (args.command, getattr(args, "hub_command", None)) if v)
    try:
        return COMMANDS[args.command](args)
    except CompeftError as e:
        print(f"compeft {name}: {e.code}: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"compeft {name}: {IOFailure.code}: {e.strerror or e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"compeft {name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
