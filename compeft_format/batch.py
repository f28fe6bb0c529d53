"""Compressing many adapters at once: every adapter of a folder (the sub-folders peft's
``save_pretrained`` writes for a model holding several adapters, adapter folders side by side,
single-file state dicts, fine-tuned model folders) into one output folder, in worker processes.

Each output file is written atomically, so a failed or interrupted adapter leaves nothing behind,
and one adapter's failure does not stop the others: the result names each.

Example:
    >>> sources = find_adapters("./adapters")            # {"math": Path(...), "code": Path(...)}
    >>> results = compress_many(sources, "./packed", CompeftConfig(density=0.1), workers=2)
    >>> [r.name for r in results if not r.ok]
"""

from __future__ import annotations

import concurrent.futures as cfut
import multiprocessing
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import constants as C
from .errors import CompeftError, InvalidArgument, IOFailure
from .peft_io import ADAPTER_CONFIG, ADAPTER_WEIGHTS, ADAPTER_WEIGHTS_BIN, is_model_checkpoint

if TYPE_CHECKING:
    from .compress import CompeftConfig

PathLike = str | os.PathLike[str]
SUFFIX = ".cpeft.safetensors"


def is_adapter_folder(p: Path) -> bool:
    """A folder holding a PEFT adapter's config or weights at its top."""
    return p.is_dir() and any((p / n).is_file() for n in (ADAPTER_CONFIG, ADAPTER_WEIGHTS, ADAPTER_WEIGHTS_BIN))


def _is_model_folder(p: Path) -> bool:
    return p.is_dir() and is_model_checkpoint(p)  # as read_source, which compresses it, tells them apart


#: how deep ``find_adapters`` looks into folders that hold adapters
MAX_DEPTH = 3


def find_adapters(folder: PathLike) -> dict[str, Path]:
    """The adapters in ``folder``, by the name their output takes: the folder's own adapter
    (``default``, as peft names the adapter it saves at the top of a multi-adapter folder), each
    sub-folder holding an adapter or a model checkpoint (its name), and each ``.safetensors``
    state dict beside them (its name without the suffix). A sub-folder's own sub-folders of
    adapters (a multi-adapter folder among others, or a folder grouping adapters) are found too,
    down to ``MAX_DEPTH`` levels, named ``folder.adapter``. Compressed files and hidden entries are
    skipped.

    Raises:
        InvalidArgument: two adapters would take the same name.
    """
    root = Path(folder)
    found: dict[str, Path] = {}

    def add(name: str, p: Path) -> None:
        if name in found:
            raise InvalidArgument(f"{found[name]} and {p} would both be compressed to {name}{SUFFIX}: rename one")
        found[name] = p

    def walk(d: Path, prefix: str, depth: int) -> None:
        try:
            entries = sorted(d.iterdir())
        except OSError:  # an unreadable folder below the one given holds nothing we can read
            if depth == 1:
                raise
            return
        for p in entries:
            if p.name.startswith("."):
                continue
            name = prefix + p.name
            try:
                adapter, model, folder = is_adapter_folder(p), _is_model_folder(p), p.is_dir() and not p.is_symlink()
            except OSError:  # unreadable: a sub-folder's entry is skipped, the top folder's is an error
                if depth == 1:
                    raise
                continue
            if adapter or model:
                add(name, p)
            elif p.is_file() and p.name.endswith(".safetensors") and not p.name.endswith(SUFFIX) \
                    and p.name not in ("adapter_model.safetensors", "model.safetensors"):
                add(name[: -len(".safetensors")], p)
            if folder and depth < MAX_DEPTH and not model:
                walk(p, name + ".", depth + 1)

    if is_adapter_folder(root):
        add("default", root)
    walk(root, "", 1)
    return found


def several_adapters(src: PathLike) -> dict[str, Path] | None:
    """The adapters ``compress`` takes from ``src`` in one go: None for one adapter, one state
    dict or one model; else ``find_adapters`` (a folder of adapters, or an adapter folder with
    others beside it in sub-folders)."""
    p = Path(src)
    if not p.is_dir() or _is_model_folder(p):
        return None
    found = find_adapters(p)
    if is_adapter_folder(p) and len(found) == 1:
        return None
    return found


@dataclass
class Result:
    """What compressing one adapter gave: the output and its sizes, or the error."""

    name: str
    source: str
    output: str
    ok: bool
    params: int = 0
    file_bytes: int = 0
    ratio_vs_fp16: float = 0.0
    relative_error: float | None = None
    emptied: list[str] = field(default_factory=list)
    code: str | None = None
    reason: str | None = None

    def to_json(self) -> dict[str, Any]:
        return dict(vars(self))


@dataclass(frozen=True)
class Job:
    """One adapter to compress (everything a worker process needs, picklable)."""

    name: str
    source: str
    output: str
    config: CompeftConfig
    overwrite: bool
    reference: str | None = None
    base: Any = None
    created_at: str | None = None
    writer: Mapping[str, Any] = field(default_factory=dict)


def compress_one(job: Job) -> Result:
    """Compress ``job.source`` into ``job.output``; errors are returned in the result."""
    try:
        from .fidelity import measure_fidelity
        from .peft_io import check_output, compress_peft, read_checkpoint, read_source
        from .report import inspect
        from .writer import check_name, save

        check_output(job.output, overwrite=job.overwrite, folder=False, inputs=[job.source])
        check_name(job.output)
        base_weights = None if job.reference is None else read_checkpoint(job.reference)
        sd, config = read_source(job.source)
        ca = compress_peft(job.source, job.config, base_weights=base_weights, base=job.base, tensors=(sd, config),
                           created_at=job.created_at)
        save(ca, job.output, **dict(job.writer))
        r = inspect(job.output)
        fid = measure_fidelity(sd, ca, base_weights=base_weights)
        return Result(job.name, job.source, job.output, True, params=r["params"], file_bytes=r["file_bytes"],
                      ratio_vs_fp16=r["ratio_vs_fp16"], relative_error=fid.relative_error, emptied=list(fid.emptied))
    except CompeftError as e:
        return Result(job.name, job.source, job.output, False, code=e.code, reason=str(e))
    except OSError as e:
        return Result(job.name, job.source, job.output, False, code=IOFailure.code, reason=e.strerror or str(e))
    except MemoryError:
        return Result(job.name, job.source, job.output, False, code=C.E_LIMIT_EXCEEDED,
                      reason="out of memory while compressing")


def _worker_init(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def compress_many(sources: Mapping[str, PathLike], out_dir: PathLike, config: CompeftConfig, *,
                  workers: int | None = None, overwrite: bool = False, reference: str | None = None,
                  base: Any = None, created_at: str | None = None, writer: Mapping[str, Any] | None = None,
                  progress: Callable[[Iterator[Result], int], Iterator[Result]] | None = None) -> list[Result]:
    """Compress each source into ``out_dir/<name>.cpeft.safetensors`` with ``config`` (the same
    method, reference, base binding and writer options for all), in ``workers`` processes (default:
    one per CPU, at most one per source; 1 works in this process). Results come back in the order
    of ``sources``; ``progress`` wraps the iterator of results as they finish (a progress bar).

    Raises:
        InvalidArgument: no sources, or ``out_dir`` is a file. FileNotFound: its parent is missing.
    """
    if not sources:
        raise InvalidArgument("no adapters to compress")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InvalidArgument(f"{out} is not a folder; give a folder for the compressed files", path=str(out))
    try:
        out.mkdir(exist_ok=True)
    except FileNotFoundError:
        raise InvalidArgument(f"the folder of {out} does not exist", path=str(out)) from None
    jobs = [Job(name, str(src), str(out / f"{name}{SUFFIX}"), config, overwrite, reference, base, created_at,
                dict(writer or {})) for name, src in sources.items()]
    n = max(1, min(workers or os.cpu_count() or 1, len(jobs)))
    done: dict[str, Result] = {}
    if n == 1:
        results: Iterator[Result] = (compress_one(j) for j in jobs)
        for r in progress(results, len(jobs)) if progress else results:
            done[r.name] = r
    else:
        threads = max(1, (os.cpu_count() or 1) // n)
        with cfut.ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_init,
                                      initargs=(threads,)) as pool:
            futures = [pool.submit(compress_one, j) for j in jobs]
            finished = (f.result() for f in cfut.as_completed(futures))
            for r in progress(finished, len(jobs)) if progress else finished:
                done[r.name] = r
    return [done[j.name] for j in jobs]


__all__ = ["find_adapters", "several_adapters", "compress_many", "compress_one", "Job", "Result", "SUFFIX"]
