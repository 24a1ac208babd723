"""What the parent hands one engine subprocess, and how it travels (a JSON file)."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench.workload import Request


@dataclass
class Job:
    engine: str  # kvmux | hf-static | hf-cb | llama-cpp
    label: str  # how results name it, e.g. hf-static-b8
    mode: str  # offline | online
    dtype: str  # float32 | bfloat16
    model: str | None  # kvmux's model argument; None: the default SmolLM2
    hf_folder: str  # the same weights as a transformers folder
    requests: list[Request]
    options: dict = field(default_factory=dict)  # engine-specific: batch_size, max_num_seqs, ...

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self)))

    @classmethod
    def load(cls, path: Path) -> "Job":
        data = json.loads(Path(path).read_text())
        data["requests"] = [Request(**r) for r in data["requests"]]
        return cls(**data)
