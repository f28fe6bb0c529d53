"""Full fine-tunes: a compeft file that stores the difference between a fine-tuned model and the
model it was fine-tuned from (``adapter.representation`` ``delta``, spec 3.5), applied to that
base's checkpoint to write the fine-tuned checkpoint again.

Example:
    >>> ca = cf.compress_peft("./finetuned", reference=cf.peft_io.read_checkpoint("./base"))
    >>> cf.save(ca, "ft.cpeft.safetensors")
    >>> apply_delta("ft.cpeft.safetensors", "./base", "./rebuilt")   # sharded safetensors + config
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from huggingface_hub import save_torch_state_dict
from safetensors import safe_open

from . import binding
from . import constants as C
from .errors import InvalidArgument, ModelMismatch, NotSafetensors
from .fileio import atomic_folder
from .peft_io import check_output, no_subfolder
from .reader import CompeftFile

PathLike = str | os.PathLike[str]

#: files of a model folder that hold weights (not copied beside the rebuilt checkpoint)
WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json", ".bin", ".bin.index.json", ".pt", ".pth", ".ckpt",
                   ".h5", ".msgpack", ".gguf")


def apply_delta(path: PathLike, base: PathLike, output: PathLike, *, overwrite: bool = False,
                max_shard_size: int | str = "5GB", check_base: bool = True) -> list[Path]:
    """Write ``output``, a model folder: every tensor of the checkpoint ``base`` (a model folder,
    a sharded index or a ``.safetensors`` file) plus its delta from the file ``path``, added in
    float32 and rounded once to the base tensor's dtype; tensors without a delta are copied. The
    weights are written as safetensors shards of at most ``max_shard_size`` (with an index when
    there are several), beside a copy of the base folder's other files (``config.json``, the
    tokenizer's files, ...). The folder is published whole; an existing one is replaced only with
    ``overwrite``, and only when it is a model folder (``config.json``, no subfolders) that holds
    neither input.

    Returns:
        The files of ``output``.

    Raises:
        InvalidArgument: the file does not store deltas, or ``output`` exists (and may not be
            replaced).
        BaseMismatch: the file records a base fingerprint that ``base`` does not have (unless
            ``check_base`` is false).
        ModelMismatch: a delta names a tensor ``base`` lacks, or has another shape.
        and the errors of reading the file (``open_file``) and the checkpoint.
    """
    out = check_output(output, overwrite=overwrite, folder=True, inputs=[path, base],
                       replaceable=lambda folder: (folder / "config.json").is_file() and no_subfolder(folder))
    with CompeftFile(path) as f:
        m = f.manifest
        if m.adapter.representation != C.REPRESENTATION_DELTA:
            raise InvalidArgument(f"{path} stores an adapter's weights, not the deltas of a full fine-tune "
                                  f"(load it with compeft_format.load_adapter)", path=str(path))
        if check_base and m.base_model.fingerprint is not None:
            binding.check(m.base_model, base, require=True, subject=str(path))
        deltas = f.state_dict(dtype=torch.float32, verify=True)
    files = binding.checkpoint_files(base if not str(base).endswith(".index.json") else Path(base).parent)
    missing = sorted(set(deltas) - set(files))
    if missing:
        raise ModelMismatch(f"{path} holds deltas of {len(missing)} tensor(s) the base lacks, e.g. {missing[0]!r}",
                            modules=missing)
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(set(files.values())):
        try:
            with safe_open(str(shard), framework="pt") as g:
                for name in g.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    state[name] = g.get_tensor(name)
        except Exception as e:  # safetensors raises its own untyped errors
            raise NotSafetensors(f"cannot read {shard}: {e}", path=str(shard)) from None
    for name, d in deltas.items():
        t = state[name]
        if tuple(t.shape) != tuple(d.shape):
            raise ModelMismatch(f"{name}: the base tensor has shape {tuple(t.shape)}, the delta {tuple(d.shape)}",
                                modules=[name])
        if not t.is_floating_point():
            raise ModelMismatch(f"{name}: the base tensor is {t.dtype}, not a float tensor a delta applies to",
                                modules=[name])
        state[name] = (t.to(torch.float32) + d).to(t.dtype)
    folder = Path(base) if Path(base).is_dir() else Path(base).parent
    names: list[str] = []

    def fill(tmp: Path) -> None:
        save_torch_state_dict(state, tmp, max_shard_size=max_shard_size, metadata={"format": "pt"})
        for p in sorted(folder.iterdir()):  # the model's other files: config, tokenizer, ...
            if p.is_file() and not p.name.endswith(WEIGHT_SUFFIXES) and not p.name.startswith("."):
                shutil.copyfile(p, tmp / p.name)
        names.extend(sorted(q.name for q in tmp.iterdir()))

    atomic_folder(out, fill, replace=overwrite)
    return [out / n for n in names]


__all__ = ["apply_delta", "WEIGHT_SUFFIXES"]
