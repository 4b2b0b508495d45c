"""Write the golden store ``tests/golden/store-v1/`` (format version 1) — once.

The golden store is committed and decoded on every test run (``tests/test_store.py``), so a store
written by this version of vstore keeps opening after the format moves on. Do not regenerate it
when the writer changes: a change that makes the test fail on the committed files breaks old
stores. Write a new ``store-vN`` (and a new test) for a new format version instead.

Contents (all fixed; the test spells them out independently of this script)::

    2 captured layers (model layers 0 and 1), 3 neurons, float16, pooling "token", chunk_rows 2,
    rows/* chunked (8,)
    examples  0: id "honesty-0-en:aligned",  text "Tom returned the wallet.",  value honesty, lang en
              1: id "justice-0-zh:violating", text "小明拿走了钱包。",           value justice, lang zh
    rows      example [0, 0, 0, 1, 1], position [1, 2, 3, 1, 2], token [101, 102, 103, 201, 202]
    acts      (2, 5, 3): (arange(30) - 12) / 8, with acts[0, 1, 1] = -0.0 and acts[1, 4, 2] = 65504

Usage::

    python tools/make_golden_store.py [OUT] [--overwrite]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import vstore.store._format as vstore_format
from vstore.store import PartWriter, Store

__all__ = ["GOLDEN_DIR", "golden_acts", "make_golden_store"]

GOLDEN_DIR = Path(__file__).resolve().parents[1] / "tests" / "golden" / "store-v1"
# rows/* are chunked (65536,) by default and stored uncompressed, which would make this 5-row store
# weigh 1 MB; the format does not pin that chunk size (readers take it from the array metadata),
# so the golden store uses 8-row chunks and stays a few KB.
GOLDEN_ROWS_CHUNK = 8


def golden_acts() -> np.ndarray:
    """The golden activations, (layers 2, rows 5, neurons 3) float16."""
    acts = ((np.arange(30, dtype=np.float32) - 12) / 8).reshape(2, 5, 3).astype(np.float16)
    acts[0, 1, 1] = np.float16(-0.0)
    acts[1, 4, 2] = np.float16(65504)
    return acts


def make_golden_store(out: str | Path = GOLDEN_DIR, *, overwrite: bool = False) -> Path:
    """Write the golden store to ``out``.

    Parameters
    ----------
    out
        Target folder (default ``tests/golden/store-v1``).
    overwrite
        Replace an existing store there (only when deliberately re-baselining).

    Returns
    -------
    Path
        The folder written.
    """
    out = Path(out)
    meta = {
        "model": {
            "name": "golden-tiny-llama", "source": "local:golden-tiny-llama", "sha256": "0" * 64,
            "architecture": "llama", "n_layers": 2, "n_neurons": 3,
        },
        "site": "act",
        "layers": [0, 1],
        "dtype": "float16",
        "storage_dtype": "float16",
        "pooling": "token",
        "compressor": "none",
        "chunk_rows": 2,
        "versions": {
            "vstore": "0.1.0", "torch": "2.13.0", "transformers": "5.24.0", "zarr": "3.1.6",
            "numpy": np.__version__, "python": sys.version.split()[0],
        },
    }
    store = Store.create(out, meta, overwrite=overwrite)
    start = store.add_examples(
        ["honesty-0-en:aligned", "justice-0-zh:violating"],
        ["Tom returned the wallet.", "小明拿走了钱包。"],
        [{"value": "honesty", "lang": "en"}, {"value": "justice", "lang": "zh"}],
    )
    dataset = {
        "paths": ["golden.jsonl"], "sha256": "1" * 64, "examples": 2, "split": "activation",
        "texts": None, "labels": {}, "limit": None,
    }
    build = {"batch_size": 2, "max_length": 64, "device": "cpu", "pool": "token"}
    default_rows_chunk = vstore_format.ROWS_CHUNK
    vstore_format.ROWS_CHUNK = GOLDEN_ROWS_CHUNK
    try:
        part = store.start_part(2, start, {"dataset": dataset, "build": build}, compressor="none")
    finally:
        vstore_format.ROWS_CHUNK = default_rows_chunk
    writer = PartWriter(store, part)
    acts = golden_acts()
    example = np.array([0, 0, 0, 1, 1], dtype=np.int64)
    position = np.array([1, 2, 3, 1, 2], dtype=np.int32)
    token = np.array([101, 102, 103, 201, 202], dtype=np.int32)
    writer.add(acts[:, :3], example[:3], position[:3], token[:3], 1)
    writer.add(acts[:, 3:], example[3:], position[3:], token[3:], 2)
    writer.flush()
    store.commit(part, 2, writer.written)
    store.finish_part(part)
    return out


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: write the golden store."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", nargs="?", default=str(GOLDEN_DIR))
    ap.add_argument("--overwrite", action="store_true", help="replace an existing golden store")
    args = ap.parse_args(argv)
    path = make_golden_store(args.out, overwrite=args.overwrite)
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
