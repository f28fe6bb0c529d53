"""CPET / CA-LoRA: task adapters trained on a compressed base model (quantised or pruned), with
knowledge inheritance from the uncompressed model and recovery modules; artifacts are exported in
the compeft format bound to the compressed base they were trained on."""

__all__: list[str] = []
