"""What identifies a cache file: its key (everything that changes the numbers) and its name."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np

SCHEMA_VERSION = 1
ARRAYS = ("features", "labels", "indices")
KEY_FIELDS = ("backbone", "weights", "size", "preprocess", "pooling", "dtype", "dataset", "split", "view", "precision",
              "cut")


@dataclass(frozen=True)
class FeatureKey:
    """The identity of one cached array; ``digest`` is its short key."""

    backbone: str
    weights: str
    size: int
    preprocess: str
    pooling: str
    dtype: str
    dataset: str
    split: str
    view: str = "orig"
    # The engine's arithmetic: 'f32', or 'bf16' (OpenVINO on AMX/AVX512-BF16 CPUs). bf16 features are not
    # interchangeable with f32 ones bit for bit, so bf16 enters the key; f32 does not, so caches made
    # before precision existed keep their keys.
    precision: str = "f32"
    # Empty for pooled features; for an activation cache (``features --cut``) the cut's name
    # (``featcache.backbones.cuts``), with pooling 'none'. Left out of the digest when empty, as precision.
    cut: str = ""

    @property
    def digest(self) -> str:
        fields_ = asdict(self)
        if fields_["precision"] == "f32":
            del fields_["precision"]
        if not fields_["cut"]:
            del fields_["cut"]
        text = json.dumps(fields_, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    @property
    def filename(self) -> str:
        at = f"@{self.cut.replace(':', '.')}" if self.cut else ""
        return f"{self.backbone}{at}-{self.size}-{self.split}-{self.view}-{self.digest}.h5"

    @classmethod
    def from_attrs(cls, attrs) -> "FeatureKey":
        values = {}
        for f in fields(cls):
            if f.name in ("precision", "cut") and f.name not in attrs:
                continue  # written before these were recorded: f32, pooled
            value = attrs[f.name]
            values[f.name] = int(value) if f.name == "size" else str(value)
        return cls(**values)


@dataclass
class FeatureSet:
    """Rows of one cache file, in memory: ``features[i]`` is image ``indices[i]`` of the split."""

    features: np.ndarray
    labels: np.ndarray
    indices: np.ndarray
    class_names: list[str]
    key: FeatureKey
    path: Path
    attrs: dict = field(default_factory=dict)

    @property
    def width(self) -> int:
        return int(self.features.shape[1])


# The name every cache file gets from ``FeatureKey.filename``; ``cache rm`` only deletes files named so.
_FILENAME = re.compile(r"^.+-\d+-[^-]+-[^-]+-[0-9a-f]{12}\.h5$")
