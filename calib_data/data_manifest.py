"""The calibration / evaluation manifest: one JSON record per line, no header.

Each line is one (image frame, task) sample with its prompt, expected answer and ground truth.
Paths inside a record are relative to the manifest's directory, so a data set can be moved or
copied as a folder. Every record carries `"schema": 1`.

Default split of a generated set (`split_of`): image index i is "eval" when i % 10 == 0,
"calib" when i % 10 == 1, else "train" -- 10 % eval, 10 % calibration, 80 % training, stable
when a set grows, and the same for all three task records of an image.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

from citrus_edge.atomic import atomic_path
from citrus_edge.tasks import TASKS

from .data_errors import ManifestError

SCHEMA = 1
SPLITS = ("train", "calib", "eval")
MANIFEST_NAME = "manifest.jsonl"


def split_of(index: int) -> str:
    """Default split of image `index` in a generated set (see the module docstring)."""
    return {0: "eval", 1: "calib"}.get(index % 10, "train")


@dataclass(frozen=True)
class Record:
    """One sample: an image frame, a task, and what the model should answer."""

    id: str
    image: str  # path relative to the manifest directory
    frame: int
    task: str  # TASKS
    prompt: str
    answer: str
    masks: tuple[str, ...]  # one PNG per lesion (0/255, original resolution), relative paths
    boxes: tuple[tuple[int, int, int, int], ...]  # original pixels, x2/y2 exclusive
    lesions: tuple[dict, ...]  # attribute dicts (phantom.Lesion.to_dict())
    split: str  # SPLITS
    spacing_mm: float | None

    def __post_init__(self) -> None:
        object.__setattr__(self, "masks", tuple(self.masks))
        object.__setattr__(self, "boxes", tuple(tuple(int(v) for v in b) for b in self.boxes))
        object.__setattr__(self, "lesions", tuple(dict(d) for d in self.lesions))
        if self.task not in TASKS:
            raise ValueError(f"record {self.id}: task {self.task!r} is not one of {TASKS}")
        if self.split not in SPLITS:
            raise ValueError(f"record {self.id}: split {self.split!r} is not one of {SPLITS}")
        if any(len(b) != 4 for b in self.boxes):
            raise ValueError(f"record {self.id}: every box needs 4 coordinates")

    def to_json(self) -> str:
        """One JSON line (without newline), schema first."""
        data = asdict(self)
        data["masks"], data["boxes"] = list(self.masks), [list(b) for b in self.boxes]
        data["lesions"] = [dict(d) for d in self.lesions]
        return json.dumps({"schema": SCHEMA, **data}, sort_keys=False)

    @classmethod
    def from_dict(cls, data: dict) -> Record:
        """Build from a parsed JSON line; raises KeyError/TypeError/ValueError on bad input."""
        if data.get("schema") != SCHEMA:
            raise ValueError(f"schema {data.get('schema')!r} is not {SCHEMA}")
        spacing = data["spacing_mm"]
        return cls(
            id=str(data["id"]),
            image=str(data["image"]),
            frame=int(data["frame"]),
            task=str(data["task"]),
            prompt=str(data["prompt"]),
            answer=str(data["answer"]),
            masks=tuple(str(m) for m in data["masks"]),
            boxes=tuple(tuple(b) for b in data["boxes"]),
            lesions=tuple(data["lesions"]),
            split=str(data["split"]),
            spacing_mm=None if spacing is None else float(spacing),
        )

    def abs_image(self, manifest_dir: str | os.PathLike) -> Path:
        """Absolute path of the image file."""
        return (Path(manifest_dir) / self.image).resolve()

    def abs_masks(self, manifest_dir: str | os.PathLike) -> list[Path]:
        """Absolute paths of the mask PNGs, one per lesion."""
        return [(Path(manifest_dir) / m).resolve() for m in self.masks]


def read_manifest(path: str | os.PathLike, split: str | None = None) -> list[Record]:
    """Read every record (or those of `split`). Raises ManifestError naming file and line."""
    if split is not None and split not in SPLITS:
        raise ValueError(f"split {split!r} is not one of {SPLITS}")
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            record = _parse_line(line, path, number)
            if split is None or record.split == split:
                records.append(record)
    return records


def _parse_line(line: str, path: str | os.PathLike, number: int) -> Record:
    try:
        data = json.loads(line)
    except json.JSONDecodeError as e:
        raise ManifestError(
            f"{path}:{number}: not valid JSON ({e.msg} at column {e.colno}); fix or remove the line"
        ) from e
    if not isinstance(data, dict):
        raise ManifestError(f"{path}:{number}: expected a JSON object, got {type(data).__name__}")
    try:
        return Record.from_dict(data)
    except KeyError as e:
        raise ManifestError(
            f"{path}:{number}: missing field {e.args[0]!r}; every record needs "
            f"{', '.join(['schema', *Record.__dataclass_fields__])}"
        ) from e
    except (TypeError, ValueError) as e:
        raise ManifestError(f"{path}:{number}: invalid record ({e})") from e


def write_manifest(path: str | os.PathLike, records: Iterable[Record]) -> Path:
    """Write records as JSON lines atomically (temporary file in the same folder, then rename)."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for record in records:
            f.write(record.to_json() + "\n")
    return Path(path)
