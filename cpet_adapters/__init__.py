"""CPET / CA-LoRA: task adapters trained on a compressed base model (quantised or pruned), with
knowledge inheritance from the uncompressed model, recovery modules and distillation; artifacts
are exported in the compeft format bound to the compressed base they were trained on.

Example:
    >>> import cpet_adapters as cpet
    >>> base = cpet.compress_base("./smollm2", "./smollm2-int4", "int4:g64", source_id="org/smollm2")
    >>> cfg = cpet.TrainConfig(base="./smollm2-int4", data="train.jsonl", output="./run",
    ...                        teacher="./smollm2", inherit="./lora-on-original", recovery=True, distill=1.0)
    >>> cpet.train(cfg)
    >>> cpet.export("./run", "./out", density=0.1)          # recovery + task artifacts
    >>> model = cpet.load_into("./smollm2-int4", "./out/task.cpeft.safetensors")
"""

from typing import TYPE_CHECKING

from compeft_format import lazy

from .config import TrainConfig

# The rest is imported when first used (PEP 562): ``compeft --help`` builds the ``cpet`` flags
# from ``TrainConfig`` without importing torch or transformers.
_NAMES = {
    "base": ("DESCRIPTOR", "CompressedBase", "compress_base", "compress_model_", "load_compressed_base"),
    "export": ("Artifact", "export", "load_into", "trained_for"),
    "inherit": ("Inheritance", "inherit_lora", "read_lora"),
    "recipe": ("Recipe", "Step"),
    "train": ("TrainResult", "evaluate", "load_model", "train"),
}
if TYPE_CHECKING:
    from .base import DESCRIPTOR, CompressedBase, compress_base, compress_model_, load_compressed_base
    from .export import Artifact, export, load_into, trained_for
    from .inherit import Inheritance, inherit_lora, read_lora
    from .recipe import Recipe, Step
    from .train import TrainResult, evaluate, load_model, train

__all__ = [
    # compressed bases
    "DESCRIPTOR",
    "CompressedBase",
    "compress_base",
    "compress_model_",
    "load_compressed_base",
    "Recipe",
    "Step",
    # training
    "TrainConfig",
    "TrainResult",
    "train",
    "evaluate",
    "load_model",
    "Inheritance",
    "inherit_lora",
    "read_lora",
    # artifacts
    "Artifact",
    "export",
    "load_into",
    "trained_for",
]

lazy.install(__name__, _NAMES, functions=("train",))
