"""Read history rows back from an offline `.wandb` file (wandb 0.31 dropped its own reader).

The record format is LevelDB-log-like: a 7-byte header (":W&B" + version), then 32 KiB blocks of
chunks `crc32(4) | length(2) | type(1) | data`; types FULL=1, FIRST=2, MIDDLE=3, LAST=4.
The format is that of wandb's own (removed) `DataStore` reader.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path


def read_records(path: Path) -> list:
    """Every record (wandb_internal_pb2.Record) of a .wandb file."""
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a .wandb file"
    pos, buf, records = 7, b"", []
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:
            pos += left
            continue
        _crc, n, t = struct.unpack("<IHB", data[pos : pos + 7])
        if n == 0 and t == 0:
            pos += left
            continue
        buf = (b"" if t in (1, 2) else buf) + data[pos + 7 : pos + 7 + n]
        pos += 7 + n
        if t in (1, 4):
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(buf)
            records.append(rec)
    return records


def read_history(path: Path) -> list[dict]:
    rows = []
    for rec in read_records(path):
        if rec.HasField("history"):
            rows.append(
                {
                    (i.key or "/".join(i.nested_key)): json.loads(i.value_json)
                    for i in rec.history.item
                }
            )
    return rows
