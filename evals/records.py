"""records.jsonl: one meta line, then one JSON record per finished cell, appended and flushed one by one so an
interrupted run keeps everything it finished and `--resume` skips it."""

from __future__ import annotations

import json
import os
from pathlib import Path

FORMAT = "kvcompress-records/1"


class RecordStore:
    def __init__(self, path: Path, meta: dict | None = None):
        """Open `path`: with `meta`, start a new file (refusing to overwrite finished records; a file holding none, left
        by a run that failed before its first cell, is started over); without, resume an existing one."""
        self.path = Path(path)
        self.records: list[dict] = []
        if meta is None:
            self.meta = self._load()
        else:
            if self.path.exists() and self.path.stat().st_size and RecordStore(self.path).records:
                raise FileExistsError(f"{self.path} already holds records: resume it or choose another output folder")
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise ValueError(f"output folder {str(self.path.parent)!r} cannot be made: {err.strerror}") from None
            self.meta = {"kind": "meta", "format": FORMAT, **meta}
            self.path.write_text(json.dumps(self.meta) + "\n")
        self.done = {self.key(r) for r in self.records if self._finished(r)}

    def _load(self) -> dict:
        if not self.path.is_file():
            raise FileNotFoundError(f"nothing to resume: {self.path} does not exist")
        text = self.path.read_text()
        lines = text.split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        elif lines:  # a final line without its newline was cut off mid-write: that cell is simply redone
            lines.pop()
            self.path.write_text("\n".join(lines) + ("\n" if lines else ""))
        parsed = []
        for number, line in enumerate(lines, 1):
            try:
                parsed.append(json.loads(line))
            except json.JSONDecodeError:
                raise ValueError(f"{self.path} line {number} is not JSON: the records file is corrupt") from None
        if not parsed or parsed[0].get("kind") != "meta" or parsed[0].get("format") != FORMAT:
            raise ValueError(f"{self.path} is not a kvcompress records file (its first line is no {FORMAT} meta)")
        self.records = parsed[1:]
        return parsed[0]

    @staticmethod
    def key(record: dict) -> str | tuple:
        """The cell's content-addressed id (records before ids: the cell's coordinates)."""
        return record["id"] if "id" in record else RecordStore.coordinates(record)

    @staticmethod
    def coordinates(record: dict) -> tuple:
        return tuple(
            record[k] for k in ("kind", "strategy", "task", "length", "depth", "seed", "question") if k in record
        )

    def has(self, cell: dict) -> bool:
        """Whether `cell` finished here: by its id, or by its coordinates in a file written before ids."""
        return cell["id"] in self.done or self.coordinates(cell) in self.done

    @staticmethod
    def _finished(record: dict) -> bool:
        return record.get("outcome") != "error"  # a cell whose worker kept dying is tried again on resume

    def replace_meta(self, meta: dict) -> None:
        """A new first line (a widened grid), the records kept."""
        self.write(self.path, meta, self.records)
        self.meta = meta

    @staticmethod
    def write(path: Path, meta: dict, records: list[dict]) -> None:
        """A whole records file, written beside and renamed over, so a crash leaves either file whole."""
        temporary = Path(path).with_suffix(".jsonl.tmp")
        with temporary.open("w") as f:
            f.write("".join(json.dumps(r) + "\n" for r in [meta, *records]))
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)

    def append(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.records.append(record)
        if self._finished(record):
            self.done.add(self.key(record))
