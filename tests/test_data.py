"""The bundled benchmark (counts, pairing, quality rules) and the data tools."""

from __future__ import annotations

import collections
import itertools
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import sparse

from vstore.cli import main
from vstore.data import (
    SETTINGS,
    bundled_stories,
    bundled_values,
    join_text,
    load_examples,
    load_stories,
    sample_stories,
)
from vstore.datatools import import_stories, parse_mapping, story_stats
from vstore.errors import DataError, UsageError
from vstore.inference import detectable_drop, mcnemar_power

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import check_stories

KEYS = ["prosperity", "democracy", "civility", "harmony", "freedom", "equality", "justice", "rule_of_law",
        "patriotism", "dedication", "integrity", "friendliness"]


@pytest.fixture(scope="module")
def bundled():
    return load_stories(bundled_stories())


def _stem(i: str) -> str:
    return re.sub(r"-(zh|en)$", "", i)


def test_settings_vocabulary_is_one():
    assert check_stories.SETTINGS is SETTINGS


def test_values_json_has_the_twelve_values():
    vals = bundled_values()
    assert [v["key"] for v in vals] == KEYS
    for v in vals:
        assert v["zh"] and v["en"] and len(v["definition_zh"]) > 40 and len(v["definition_en"].split()) > 25


def test_counts_per_value_language_split(bundled):
    count = collections.Counter((s.value, s.lang, s.split) for s in bundled)
    for key in KEYS:
        for lang in ("zh", "en"):
            assert count[(key, lang, "activation")] >= 100, (key, lang)
            assert count[(key, lang, "evaluation")] >= 100, (key, lang)
    assert {s.value for s in bundled} == set(KEYS)


def test_parallel_ids_and_fields(bundled):
    by_stem = collections.defaultdict(dict)
    for s in bundled:
        by_stem[_stem(s.id)][s.lang] = s
        assert s.id.endswith(f"-{s.lang}")
        assert (s.rationale is not None) == (s.split == "activation")
    for stem, langs in by_stem.items():
        assert set(langs) == {"zh", "en"}, stem
        assert langs["zh"].value == langs["en"].value and langs["zh"].split == langs["en"].split


def test_languages_and_lengths(bundled):
    for s in bundled:
        cjk = sum("\u4e00" <= c <= "\u9fff" for c in s.story) / len(s.story)
        assert (cjk > 0.3) == (s.lang == "zh"), s.id
        if s.lang == "zh":
            assert 40 <= len(s.story) <= 220, (s.id, len(s.story))
            assert 6 <= len(s.aligned) <= 80 and 6 <= len(s.violating) <= 80, s.id
        else:
            assert 25 <= len(s.story.split()) <= 120, (s.id, len(s.story.split()))
            assert 4 <= len(s.aligned.split()) <= 40 and 4 <= len(s.violating.split()) <= 40, s.id
        sentences = [x for x in re.split(r"[.!?。！？]+", s.story) if x.strip()]
        assert 2 <= len(sentences) <= 7, (s.id, len(sentences))


def test_aligned_not_systematically_longer(bundled):
    for lang in ("zh", "en"):
        sub = [s for s in bundled if s.lang == lang]
        mean_a = sum(len(s.aligned) for s in sub) / len(sub)
        mean_v = sum(len(s.violating) for s in sub) / len(sub)
        longer = sum(len(s.aligned) > len(s.violating) for s in sub) / len(sub)
        assert 0.85 < mean_a / mean_v < 1.15, (lang, mean_a, mean_v)
        assert 0.3 < longer < 0.7, (lang, longer)


def _grams(t: str, n: int = 5) -> set[str]:
    t = re.sub(r"\s+", " ", t.lower())
    return {t[i : i + n] for i in range(max(1, len(t) - n + 1))}


def test_no_near_duplicates_within_value_and_language(bundled):
    groups = collections.defaultdict(list)
    for s in bundled:
        groups[(s.value, s.lang)].append((s.id, _grams(s.story)))
    worst = (0.0, "", "")
    for items in groups.values():
        for (ia, a), (ib, b) in itertools.combinations(items, 2):
            j = len(a & b) / len(a | b)
            worst = max(worst, (j, ia, ib))
    assert worst[0] < 0.5, worst


def test_settings_are_tagged_and_spread(bundled):
    cells: dict[tuple[str, str, str], collections.Counter] = collections.defaultdict(collections.Counter)
    for s in bundled:
        assert s.setting in SETTINGS, (s.id, s.setting)
        cells[(s.value, s.lang, s.split)][s.setting] += 1
    for cell, c in cells.items():
        total = sum(c.values())
        assert len(c) >= check_stories.MIN_SETTINGS, (cell, dict(c))
        assert max(c.values()) / total <= check_stories.MAX_SETTING_SHARE, (cell, dict(c))


def test_length_balance_per_value_and_language(bundled):
    for key in KEYS:
        for lang in ("zh", "en"):
            sub = [s for s in bundled if s.value == key and s.lang == lang]
            ratio = sum(len(s.aligned) for s in sub) / sum(len(s.violating) for s in sub)
            assert 0.85 <= ratio <= 1.15, (key, lang, ratio)


def test_parallel_items_are_translations_in_length(bundled):
    by_stem = collections.defaultdict(dict)
    for s in bundled:
        by_stem[_stem(s.id)][s.lang] = s
    for stem, p in by_stem.items():
        zh, en = p["zh"], p["en"]
        assert zh.setting == en.setting, stem
        for field, (lo, hi) in (("story", check_stories.STORY_RATIO), ("aligned", check_stories.ACTION_RATIO),
                                ("violating", check_stories.ACTION_RATIO)):
            r = len(getattr(en, field)) / len(getattr(zh, field))
            assert lo <= r <= hi, (stem, field, round(r, 2))


def _jaccard_matrix(texts: list[str]) -> np.ndarray:
    """5-gram Jaccard of every pair of texts (dense, from a sparse text x gram incidence matrix)."""
    vocab: dict[str, int] = {}
    rows, cols = [], []
    for i, t in enumerate(texts):
        for g in _grams(t):
            rows.append(i)
            cols.append(vocab.setdefault(g, len(vocab)))
    x = sparse.csr_matrix((np.ones(len(rows), np.int32), (rows, cols)), shape=(len(texts), len(vocab)))
    inter = (x @ x.T).toarray().astype(np.float64)
    size = np.diag(inter)
    return inter / (size[:, None] + size[None, :] - inter)


def test_jaccard_matrix_matches_sets() -> None:
    texts = ["the cat sat on the mat", "the cat sat on a mat", "完全不同的一句话", "the cat sat on the mat"]
    j = _jaccard_matrix(texts)
    for a, b in itertools.combinations(range(len(texts)), 2):
        ga, gb = _grams(texts[a]), _grams(texts[b])
        assert j[a, b] == pytest.approx(len(ga & gb) / len(ga | gb))


def test_no_near_duplicates_across_the_benchmark(bundled):
    for lang in ("zh", "en"):
        sub = [s for s in bundled if s.lang == lang]
        j = _jaccard_matrix([s.story for s in sub])
        np.fill_diagonal(j, 0.0)
        a, b = np.unravel_index(int(np.argmax(j)), j.shape)
        assert j[a, b] < 0.5, (sub[a].id, sub[b].id, float(j[a, b]))


def test_power_of_the_exact_mcnemar_test() -> None:
    from scipy.stats import binomtest

    rng = np.random.default_rng(7)
    n, drop, flip, reps = 60, 0.15, 0.05, 3000
    hits = 0
    for _ in range(reps):
        b, c, _rest = rng.multinomial(n, [drop + flip, flip, 1 - drop - 2 * flip])
        hits += (1.0 if b + c == 0 else binomtest(int(b), int(b + c), 0.5).pvalue) < 0.05
    exact = mcnemar_power(n, drop, flip_rate=flip)
    assert abs(hits / reps - exact) < 4 * np.sqrt(exact * (1 - exact) / reps)
    assert mcnemar_power(n, 0.0, flip_rate=0.0) == 0.0
    d50, d200 = detectable_drop(50, 0.6), detectable_drop(200, 0.6)
    assert d50 is not None and d200 is not None and d200 < d50
    assert mcnemar_power(50, d50) >= 0.8 > mcnemar_power(50, d50 - 0.005)
    assert detectable_drop(4, 0.6) is None  # four items can never reach p < 0.05


def test_evaluation_stories_differ_from_activation_stories(bundled):
    for key in KEYS:
        for lang in ("zh", "en"):
            act = [_grams(s.story) for s in bundled if s.value == key and s.lang == lang and s.split == "activation"]
            ev = [_grams(s.story) for s in bundled if s.value == key and s.lang == lang and s.split == "evaluation"]
            assert max(len(a & e) / len(a | e) for a in act for e in ev) < 0.5


def test_sample_is_a_subset_of_the_benchmark(bundled):
    full = {s.id: s for s in bundled}
    sample = load_stories(sample_stories())
    assert {s.value for s in sample} == set(KEYS)
    assert {s.split for s in sample} == {"activation", "evaluation"}
    for s in sample:
        assert full[s.id].story == s.story and full[s.id].aligned == s.aligned


def test_text_templates(tmp_path):
    f = tmp_path / "s.jsonl"
    rows = [
        {"id": "a-zh", "value": "v", "lang": "zh", "split": "activation", "story": "故事。", "aligned": "做好事。",
         "violating": "做坏事。", "rationale": "因为好。"},
        {"id": "a-en", "value": "v", "lang": "en", "split": "evaluation", "story": "A story.", "aligned": "Good.",
         "violating": "Bad."},
    ]
    f.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows), encoding="utf-8")
    act = load_examples(f)
    assert [e.text for e in act] == ["故事。做好事。因为好。"]
    ev = load_examples(f, split="evaluation")
    assert [e.text for e in ev] == ["A story."]
    both = load_examples(f, texts=["aligned", "violating"])
    assert [e.text for e in both] == ["故事。做好事。", "故事。做坏事。"]
    assert [e.labels["polarity"] for e in both] == ["aligned", "violating"]
    assert join_text(["A.", "B."], "en") == "A. B."


def test_duplicate_ids_and_wrong_types(tmp_path):
    f = tmp_path / "d.jsonl"
    line = {"id": "x", "value": "v", "lang": "en", "split": "evaluation", "story": "s", "aligned": "a", "violating": "b"}
    f.write_text(json.dumps(line) + "\n" + json.dumps(line) + "\n" + json.dumps({**line, "id": 3}) + "\n")
    with pytest.raises(DataError) as ei:
        load_stories(f)
    msg = str(ei.value)
    assert f"{f}:2: field 'id' 'x' repeats line 1 (split 'evaluation')" in msg and f"{f}:3: field 'id' must be a string" in msg
    # the same id in the other split is another item (an activation story and its evaluation twin)
    f.write_text(json.dumps(line) + "\n" + json.dumps({**line, "split": "activation", "rationale": "r"}) + "\n")
    assert [s.split for s in load_stories(f)] == ["evaluation", "activation"]


def test_cli_validate_stats_import(tmp_path, capsys):
    assert main(["data", "validate", str(sample_stories())]) == 0
    assert main(["data", "stats", str(sample_stories()), "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert len(st["values"]) == 12 and st["langs"] == ["en", "zh"]
    assert story_stats(sample_stories())["items"] == st["items"]
    assert main(["data", "stats", str(sample_stories())]) == 0
    assert "smallest detectable drop" in capsys.readouterr().out
    assert main(["data", "stats", str(sample_stories()), "--baseline", "1.5"]) == 2
    assert "--baseline" in capsys.readouterr().err
    with pytest.raises(UsageError, match="baseline"):
        story_stats(sample_stories(), baseline=0.0)
    st = story_stats(sample_stories(), baseline=0.7)
    overall = st["power"]["rows"][-1]
    assert (overall["value"], overall["lang"], overall["n"]) == ("*", "*", 48)
    assert overall["detectable_drop"] == detectable_drop(48, 0.7)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a"}\n')
    assert main(["data", "validate", str(bad)]) == 2
    assert f"{bad}:1: missing field 'value'" in capsys.readouterr().err

    csv = tmp_path / "mine.csv"
    csv.write_text("text,good,bad,label\n\"A tale, told.\",Help.,Refuse.,kindness\nAnother tale.,Share.,Hoard.,kindness\n")
    out = tmp_path / "mine.jsonl"
    rc = main(["data", "import", str(csv), "--map", "story=text,aligned=good,violating=bad,value=label",
               "--label", "split=evaluation", "--label", "lang=en", "--out", str(out)])
    assert rc == 0
    items = load_stories(out)
    assert [i.id for i in items] == ["mine-2", "mine-3"] and items[0].story == "A tale, told."
    # a missing split gives a clear error and writes nothing
    out2 = tmp_path / "none.jsonl"
    with pytest.raises(DataError, match="missing field 'split'"):
        import_stories(csv, out2, parse_mapping("story=text,aligned=good,violating=bad,value=label"), {"lang": "en"})
    assert not out2.exists()
    with pytest.raises(DataError, match="column 'nope'"):
        import_stories(csv, out2, {"story": "nope"}, {})
    with pytest.raises(DataError, match="not a schema field"):
        parse_mapping("tale=text")
