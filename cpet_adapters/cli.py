"""``compeft cpet ...``: compress a base model, train CPET adapters on it, export the artifacts.

    compeft cpet compress-base ./smollm2 -o ./smollm2-int4 --recipe int4:g128
    compeft cpet train ./smollm2-int4 --teacher ./smollm2 --inherit ./lora-on-original \\
        --recovery --distill 1.0 --data train.jsonl --eval val.jsonl -o ./run
    compeft cpet export ./run -o ./out --density 0.1

``train`` has one flag per ``TrainConfig`` field (``--config FILE`` reads them from JSON; flags
given on the command line win).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from typing import Any

from compeft_format.errors import InvalidArgument


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_parser(sub: Any) -> None:
    """Add ``cpet`` and its commands to the ``compeft`` parser's subcommands ``sub``."""
    from .config import TrainConfig

    cp = sub.add_parser("cpet", help="train adapters for a compressed base model (CPET / CA-LoRA)")
    cs = cp.add_subparsers(dest="cpet_command", required=True)

    cb = cs.add_parser("compress-base", help="quantise and/or prune a base model; write it with its descriptor")
    cb.add_argument("source", help="a transformers model folder (safetensors)")
    cb.add_argument("-o", "--output", required=True, help="the compressed model folder to create")
    cb.add_argument("--recipe", required=True,
                    help="e.g. int8, int4:g128, int3:g64:asym, nf4, 2:4, prune:0.5, wanda:2:4, 2:4+int4:g128")
    cb.add_argument("--calibration", default=None, metavar="FILE",
                    help="calibration text for Wanda: JSON Lines with \"text\", or plain text")
    cb.add_argument("--calibration-samples", type=int, default=64)
    cb.add_argument("--seq-len", type=int, default=128)
    cb.add_argument("--source-id", default=None, help="the source model's id (e.g. a Hub repository) to record")
    cb.add_argument("--source-revision", default=None)
    cb.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    cb.add_argument("--packed", choices=["compressed-tensors"], default=None,
                    help="store the round-to-nearest codes packed with their scales (a compressed-tensors "
                         "checkpoint transformers loads) instead of the effective float32 weights")

    tr = cs.add_parser("train", help="train a task LoRA (and recovery modules) on a compressed base")
    tr.add_argument("base", nargs="?", default=None, help="the compressed base model folder")
    tr.add_argument("-o", "--output", default=None, help="the run folder")
    tr.add_argument("--config", default=None, metavar="FILE", help="settings as JSON (flags override them)")
    tr.add_argument("--stop-after", type=int, default=None, help="stop after N steps with a checkpoint (resume later)")
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        if f.name in ("base", "output"):
            continue
        kind = hints[f.name]
        helptext = f.metadata.get("help", "")
        if kind is bool:
            tr.add_argument(_flag(f.name), dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                            help=helptext)
        elif kind in (int, float):
            tr.add_argument(_flag(f.name), dest=f.name, type=kind, default=None, help=helptext)
        else:  # strings, optional strings and comma-separated tuples
            tr.add_argument(_flag(f.name), dest=f.name, default=None,
                            help=helptext + (" (comma-separated)" if "tuple" in str(kind) else ""))

    ex = cs.add_parser("export", help="write a run's recovery and task artifacts, bound to its compressed base")
    ex.add_argument("run", help="the run folder of cpet train")
    ex.add_argument("-o", "--output", required=True, help="folder for the .cpeft.safetensors artifacts")
    ex.add_argument("--density", type=float, default=0.1, help="ComPEFT density of the task LoRA (1: dense)")
    ex.add_argument("--recovery-density", type=float, default=None,
                    help="ComPEFT density of the recovery modules (default: stored dense)")


def _calibration(path: str | None) -> list[str] | None:
    if path is None:
        return None
    from pathlib import Path

    p = Path(path)
    if p.suffix == ".jsonl":
        from .data import read_jsonl

        return [r.get("text") or (r.get("prompt", "") + r.get("completion", "")) for r in read_jsonl(p)]
    from compeft_format.errors import FileNotFound, InputError

    if not p.is_file():
        raise FileNotFound(f"no such calibration file: {p}", path=str(p))
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{p} is not UTF-8 text", path=str(p)) from None
    parts = [x.strip() for x in text.split("\n\n") if x.strip()]
    return parts or [text]


def run(a: argparse.Namespace) -> int:
    """Run the ``cpet`` command parsed into ``a``."""
    if a.cpet_command == "compress-base":
        from .base import compress_base

        cb = compress_base(a.source, a.output, a.recipe, calibration=_calibration(a.calibration),
                           calibration_samples=a.calibration_samples, seq_len=a.seq_len, source_id=a.source_id,
                           source_revision=a.source_revision, overwrite=a.overwrite, packed=a.packed)
        fp = cb.binding.fingerprint
        print(f"{cb.path}: {a.recipe}, fingerprint {fp.value[:16] if fp else '-'}; "
              + ", ".join(f"{k} {v}" for k, v in _summary(cb.stats).items()))
        return 0
    if a.cpet_command == "train":
        from .train import TrainConfig, train

        overrides = {f.name: getattr(a, f.name, None) for f in dataclasses.fields(TrainConfig)}
        overrides["base"], overrides["output"] = a.base, a.output
        if a.config:
            cfg = TrainConfig.from_file(a.config, **overrides)
        else:
            missing = [n for n in ("base", "data", "output") if overrides.get(n) is None]
            if missing:
                raise InvalidArgument(f"missing {', '.join(missing)} (or give --config FILE)")
            cfg = TrainConfig(**{k: v for k, v in overrides.items() if v is not None})
        r = train(cfg, stop_after=a.stop_after, progress=sys.stderr.isatty(),
                  log=lambda line: print(line, file=sys.stderr))
        state = "done" if r.finished else "stopped (resume with the same command)"
        metric = "accuracy" if cfg.task == "classify" else "token accuracy"
        ev = f"; eval loss {r.eval['loss']:.4f}, {metric} {r.eval['accuracy']:.3f}" if r.eval else ""
        print(f"{r.output}: {r.steps} steps, {state}, {r.trainable} trainable parameters{ev}")
        return 0
    if a.cpet_command == "export":
        from .export import export

        arts = export(a.run, a.output, density=a.density, recovery_density=a.recovery_density)
        for art in arts:
            print(f"{art.path}: {art.kind}, {art.size} bytes, bound to {art.base_fingerprint[:16]}")
        return 0
    raise InvalidArgument(f"unknown cpet command {a.cpet_command!r}")


def _summary(stats: dict[str, Any]) -> dict[str, Any]:
    overall = stats.get("overall", stats)
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in overall.items()
            if isinstance(v, (int, float, str))}


__all__ = ["add_parser", "run"]
