"""The Hugging Face Hub: ``push`` and ``pull`` with the real ``huggingface_hub`` client
(``client``), the repository index (``index``) and model card (``card``), and a self-hostable
Hub-compatible server (``server``, imported on its own: ``compeft hub serve``)."""

from __future__ import annotations

from ..fileio import file_sha256
from .client import PullResult, PushResult, hub_errors, pull, push, split_repo
from .index import ARTIFACT_KINDS, Index, IndexEntry

__all__ = ["push", "pull", "PushResult", "PullResult", "split_repo", "hub_errors", "Index", "IndexEntry",
           "ARTIFACT_KINDS", "file_sha256"]
