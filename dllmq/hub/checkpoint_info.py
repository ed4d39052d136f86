"""What push and the model card know about a checkpoint folder (kept apart from both, so neither imports the other)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..checkpoint.format import QuantizationConfig


@dataclass
class Checkpoint:
    """A validated checkpoint folder: every file below passed its sha256 check."""

    path: Path
    config: dict
    qcfg: QuantizationConfig
    manifest: dict
    family: str
    files: dict[str, int]  # name -> bytes: the manifest's files and the manifest itself
    extra: list[str] = field(default_factory=list)  # other entries in the folder, not uploaded

    @property
    def total_bytes(self) -> int:
        return sum(self.files.values())

    @property
    def weight_bytes(self) -> int:
        return sum(n for f, n in self.files.items() if f.endswith(".safetensors"))
