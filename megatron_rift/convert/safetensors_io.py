"""Lazy reading and shard-by-shard writing of Hugging Face safetensors checkpoints.

Reading opens a file only for the tensors asked for and closes it again, so memory-mapped pages
of tensors already converted do not stay resident. Writing keeps at most one shard in memory.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from megatron_rift.convert.errors import ConversionError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class SafetensorsCheckpoint:
    """The weights of an HF model folder: names, shapes, and tensors read on demand."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        index = self.folder / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as err:
                raise ConversionError(
                    f"{index}: not a safetensors index (needs a 'weight_map' object)"
                ) from err
            self.file_of = {name: self.folder / fname for name, fname in weight_map.items()}
            for path in sorted(set(self.file_of.values())):
                if not path.is_file():
                    raise ConversionError(
                        f"{index} lists {path.name}, which is missing from {self.folder}"
                    )
        elif (self.folder / SINGLE_FILE).is_file():
            with safe_open(self.folder / SINGLE_FILE, framework="pt") as f:
                self.file_of = dict.fromkeys(f.keys(), self.folder / SINGLE_FILE)
        else:
            found = (
                sorted(p.name for p in self.folder.glob("*.bin")) if self.folder.is_dir() else []
            )
            hint = (
                (
                    f" (found {found[:3]}: PyTorch .bin checkpoints are not read; re-save with "
                    "save_pretrained(..., safe_serialization=True))"
                )
                if found
                else ""
            )
            raise ConversionError(f"{self.folder}: no {SINGLE_FILE} or {INDEX_FILE}{hint}")

    @property
    def names(self) -> list[str]:
        return list(self.file_of)

    def read(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """Load the named tensors, opening each file once for this call."""
        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self.file_of[name], []).append(name)
        out = {}
        for path, file_names in by_file.items():
            with safe_open(path, framework="pt") as f:
                for name in file_names:
                    out[name] = f.get_tensor(name)
        return out


class ShardedSafetensorsWriter:
    """Write tensors into shards of at most ``max_shard_bytes`` (a larger single tensor gets its own),
    named and indexed the way ``save_pretrained`` does once :meth:`finish` knows their number."""

    def __init__(self, folder: str | Path, max_shard_bytes: int):
        self.folder = Path(folder)
        self.max_shard_bytes = max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + size > self.max_shard_bytes:
            self._flush()
        self._pending[name] = tensor.contiguous()
        self._pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        path = self.folder / f".shard-{len(self._shards):05d}.safetensors"
        save_file(self._pending, path, metadata={"format": "pt"})
        self._shards.append((path, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def finish(self) -> list[Path]:
        """Flush the last shard, give the shards their final names and write the index if needed."""
        if self._pending:
            self._flush()
        count = len(self._shards)
        final = []
        weight_map = {}
        for i, (tmp_path, names) in enumerate(self._shards):
            name = SINGLE_FILE if count == 1 else f"model-{i + 1:05d}-of-{count:05d}.safetensors"
            os.replace(tmp_path, self.folder / name)
            final.append(self.folder / name)
            weight_map.update(dict.fromkeys(names, name))
        if count > 1:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            (self.folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        return final
