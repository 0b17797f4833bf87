"""Write straight into the LMDB environment of a disk tier, as damage on disk would."""

from __future__ import annotations

from pathlib import Path

import lmdb


def put_raw(path: Path, database: bytes, key: bytes, value: bytes) -> None:
    """Write one value into a named database of the LMDB environment at ``path``."""
    env = lmdb.open(str(path), max_dbs=4, map_size=64 << 20)
    try:
        with env.begin(write=True) as txn:
            txn.put(key, value, db=env.open_db(database, txn=txn))
    finally:
        env.close()
