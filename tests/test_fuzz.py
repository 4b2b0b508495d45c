"""Malformed, truncated, wrongly typed and non-UTF-8 input to every reader ends in a VstoreError.

Property-based (hypothesis): the story loader and importer, the neuron-set reader, the ablation
result reader and the store's metadata. Any other exception is a bug.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import warnings
from contextlib import suppress
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from make_synthetic_store import make_synthetic_store

from vstore.data import load_stories
from vstore.datatools import import_stories
from vstore.errors import VstoreError
from vstore.neuronset import NeuronSet
from vstore.store import Store
from vstore.verify import verify_store

with warnings.catch_warnings(), suppress(ImportError):  # see tests/test_store.py
    warnings.simplefilter("ignore", DeprecationWarning)
    import hypothesis.extra._patching  # noqa: F401

FUZZ = settings(deadline=None, max_examples=60, suppress_health_check=[HealthCheck.too_slow])
JSON = st.recursive(st.none() | st.booleans() | st.integers(-10**12, 10**12) | st.floats(allow_nan=False)
                    | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
                    max_leaves=12)
FIELDS = ("id", "value", "lang", "split", "setting", "story", "aligned", "violating", "rationale")
GOOD = {"id": "a-en", "value": "v", "lang": "en", "split": "activation", "story": "A story. It ends.",
        "aligned": "Help.", "violating": "Refuse.", "rationale": "Because."}


def _tmp() -> Path:
    return Path(tempfile.mkdtemp(prefix="vstore-fuzz-"))


@FUZZ
@given(raw=st.binary(max_size=400))
def test_story_loader_on_arbitrary_bytes(raw: bytes) -> None:
    d = _tmp()
    try:
        (d / "s.jsonl").write_bytes(raw)
        with suppress(VstoreError):
            load_stories(d / "s.jsonl")
        (d / "s.csv").write_bytes(raw)
        with suppress(VstoreError):
            import_stories(d / "s.csv", d / "o.jsonl", {"story": "a", "aligned": "b", "violating": "c"}, {})
    finally:
        shutil.rmtree(d, ignore_errors=True)


@FUZZ
@given(field=st.sampled_from(FIELDS), value=JSON, drop=st.booleans())
def test_story_loader_on_wrong_fields(field: str, value: object, drop: bool) -> None:
    d = _tmp()
    try:
        row = dict(GOOD)
        if drop:
            row.pop(field, None)
        else:
            row[field] = value
        (d / "s.jsonl").write_text(json.dumps(row) + "\n", encoding="utf-8")
        with suppress(VstoreError):
            load_stories(d / "s.jsonl")
    finally:
        shutil.rmtree(d, ignore_errors=True)


@FUZZ
@given(doc=JSON | st.fixed_dictionaries({"format": JSON, "model": JSON, "method": JSON, "groups": JSON, "store": JSON}))
def test_neuron_set_reader_on_arbitrary_documents(doc: object) -> None:
    try:
        ns = NeuronSet.from_dict(doc)
        ns.site  # noqa: B018 - part of reading a set
        ns.select(None)
        ns.require_model()
    except VstoreError:
        pass


@FUZZ
@given(group=JSON, item=st.dictionaries(st.sampled_from(["layer", "neuron", "score"]), JSON, max_size=3))
def test_neuron_set_reader_on_wrong_items(group: object, item: dict) -> None:
    doc = {"format": {"name": "vstore-neurons", "version": 1}, "model": {"n_layers": 2, "n_neurons": 4},
           "method": "vape", "groups": {"g": [item], "h": group}}
    with suppress(VstoreError):
        NeuronSet.from_dict(doc).select("g,h")


@FUZZ
@given(raw=st.binary(max_size=300))
def test_ablation_result_reader_on_arbitrary_bytes(raw: bytes) -> None:
    from vstore.ablate import _load_previous

    d = _tmp()
    try:
        (d / "r.json").write_bytes(raw)
        with suppress(VstoreError):
            _load_previous(d / "r.json", {"a": 1}, overwrite=False)
    finally:
        shutil.rmtree(d, ignore_errors=True)


_STORE: dict[str, Path] = {}


def _pristine() -> Path:
    if "s" not in _STORE:
        p = _tmp() / "s"
        make_synthetic_store(p, n_layers=2, n_neurons=8, n_examples=6, rows_per_example=3, groups=2, planted=1,
                             chunk_rows=8)
        _STORE["s"] = p
    return _STORE["s"]


KEYS = ("format_version", "layers", "parts", "dtype", "model", "n_examples", "chunk_rows", "site", "pooling")


@FUZZ
@given(key=st.sampled_from(KEYS), value=JSON, part_key=st.sampled_from(
    ["committed_rows", "committed_examples", "n_examples", "example_start", "name", "state"]), in_part=st.booleans())
def test_store_metadata_fuzzed(key: str, value: object, part_key: str, in_part: bool) -> None:
    d = _tmp()
    try:
        s = d / "s"
        shutil.copytree(_pristine(), s)
        doc = json.loads((s / "zarr.json").read_text())
        meta = doc["attributes"]["vstore"]
        if in_part:
            meta["parts"][0][part_key] = value
        else:
            meta[key] = value
        (s / "zarr.json").write_text(json.dumps(doc))
        for read in (lambda: Store(s).info(), lambda: verify_store(s)):
            with suppress(VstoreError):
                read()
    finally:
        shutil.rmtree(d, ignore_errors=True)


WORDS = st.one_of(st.text(max_size=12), st.integers(-10**6, 10**6).map(str),
                  st.floats(allow_nan=True, allow_infinity=True).map(str), st.sampled_from(
                      ["value", "lang", "g00", "g00,g01", "value=g00", "polarity=a,b", "nan", "-1", "0", "1e9",
                       "auto", "cpp", "numba", "local:0", "tcp://127.0.0.1:1", "512MB", "abcGB", ""]))
RANK_FLAGS = ["--by", "--method", "--where", "--contrast", "--top-k", "--per-layer-k", "--top-rate", "--threshold",
              "--filter-rate", "--bar-ratio", "--seed", "--neurons", "--backend", "--threads", "--auroc-memory"]


@FUZZ
@given(flags=st.lists(st.tuples(st.sampled_from(RANK_FLAGS), WORDS), max_size=4),
       switches=st.lists(st.sampled_from(["--abs", "--split-half", "--no-cache", "--no-verify", "--skip-damaged"]),
                         max_size=2, unique=True))
def test_rank_command_line_fuzzed(flags: list[tuple[str, str]], switches: list[str]) -> None:
    """Any argument list ends in an exit code (0 ok, 2 bad input; argparse's own 2), never a traceback."""
    from vstore.cli import main

    d = _tmp()
    try:
        args = ["rank", str(_pristine()), "--out", str(d / "n.json"), "--no-progress", *switches]
        for flag, value in flags:
            if flag == "--dask" or value.startswith("tcp://"):
                continue  # an unreachable scheduler takes its 10 s timeout: tested on its own
            args += [flag, value]
        try:
            rc = main(args)
        except SystemExit as e:  # argparse refusing a value
            rc = int(e.code or 0)
        assert rc in (0, 1, 2)
    finally:
        shutil.rmtree(d, ignore_errors=True)
