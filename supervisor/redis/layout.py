"""Which server wrote the embedded data dir, so a different one never starts empty.

Redis 7 turns a single ``appendonly.aof`` into ``appendonlydir/`` (a manifest
plus base and incremental files); a server that does not know that layout, or
cannot read a newer RDB preamble, starts with no data or fails half-way. So
``<data_dir>/server.json`` records the family (``redis``/``valkey``), version and
AOF layout of the last server that ran on it, and a start with a server that
cannot read it is refused with one line saying what to do.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

RECORD_FILE = "server.json"
MULTIPART = "appendonlydir"
SINGLE = "appendonly.aof"


class LayoutError(RuntimeError):
    """The data dir was written by a server this binary cannot safely read."""


@dataclass(frozen=True)
class ServerRecord:
    family: str
    version: tuple[int, int, int]
    aof: str

    @property
    def label(self) -> str:
        return f"{self.family.capitalize()} {'.'.join(map(str, self.version))}"


def aof_layout(data_dir: Path) -> str | None:
    """``appendonlydir`` (7.0+), ``appendonly.aof`` (6.x) or None when there is no data."""
    if (data_dir / MULTIPART).is_dir():
        return MULTIPART
    if (data_dir / SINGLE).is_file():
        return SINGLE
    return None


def read_record(data_dir: Path) -> ServerRecord | None:
    try:
        raw = json.loads((data_dir / RECORD_FILE).read_text())
        major, minor, patch = (int(part) for part in raw["version"])
        return ServerRecord(str(raw["family"]), (major, minor, patch), str(raw["aof"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _readable_by(record: ServerRecord, family: str, version: tuple[int, int, int]) -> bool:
    """True when a ``family``/``version`` server reads what ``record``'s server wrote."""
    if record.family == family:
        return version[:2] >= record.version[:2]  # upgrades only
    # Valkey forked Redis 7.2.4 and reads its RDB/AOF; nothing reads the other way.
    return family == "valkey" and record.version[:2] <= (7, 2)


def check_layout(data_dir: Path, family: str, version: tuple[int, int, int], binary: Path) -> None:
    """Raise :class:`LayoutError` (one line) when ``binary`` must not open ``data_dir``."""
    layout = aof_layout(data_dir)
    if layout is None:
        return  # nothing to lose
    record = read_record(data_dir)
    if record is None:
        return  # written before records existed: 7+ converts a 6.x file, reads a 7.x dir
    if not _readable_by(record, family, version):
        current = ServerRecord(family, version, MULTIPART)
        raise LayoutError(
            f"{data_dir} holds data written by {record.label} and {binary} is "
            f"{current.label}, which cannot read it safely: start with a "
            f"{record.family}-server >= {'.'.join(map(str, record.version[:2]))} "
            f"(AG1_REDIS_SERVER=/path/to/it), or move {data_dir} aside to start empty"
        )


def write_record(data_dir: Path, family: str, version: tuple[int, int, int]) -> None:
    """Record the server now running on ``data_dir`` (after it started and converted)."""
    record = {"family": family, "version": list(version), "aof": aof_layout(data_dir) or MULTIPART}
    tmp = data_dir / f".{RECORD_FILE}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(record) + "\n")
    os.replace(tmp, data_dir / RECORD_FILE)
