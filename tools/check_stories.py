"""Self-check for one value's story file while writing it: counts, pairing, settings, near-duplicates
(within the file and against every other file in the same folder), length balance and zh/en length
ratios. The same rules are enforced over the whole benchmark by tests/test_data.py.

Usage: python tools/check_stories.py data/stories/<value>.jsonl
"""

import collections
import itertools
import json
import pathlib
import re
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from vstore.data import SETTINGS

REQUIRED = ("id", "value", "lang", "split", "story", "aligned", "violating", "setting")
# en/zh character-length ratio bounds of parallel texts (measured on the first 1,560 items: story
# 2.7-4.6, actions 2.0-4.8); tests/test_data.py enforces the same bounds over the whole benchmark
STORY_RATIO = (2.2, 5.5)
ACTION_RATIO = (1.5, 6.5)
MIN_SETTINGS = 6  # distinct settings per value, language and split
MAX_SETTING_SHARE = 0.35  # no setting covers more than this share of one value/language/split


def grams(text: str, n: int = 5) -> set[str]:
    t = re.sub(r"\s+", " ", text.lower())
    return {t[i : i + n] for i in range(max(1, len(t) - n + 1))}


def read(path: pathlib.Path, problems: list[str]) -> list[dict]:
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line) | {"_line": n})
        except json.JSONDecodeError as e:
            problems.append(f"{path.name}:{n}: bad JSON ({e})")
    return rows


def check_item(r: dict, problems: list[str]) -> None:
    where = f"line {r['_line']} ({r.get('id')})"
    miss = [k for k in REQUIRED if not r.get(k)]
    if miss:
        problems.append(f"{where}: missing {miss}")
    if r.get("setting") and r["setting"] not in SETTINGS:
        problems.append(f"{where}: setting {r['setting']!r} not in {SETTINGS}")
    if r.get("split") == "activation" and not r.get("rationale"):
        problems.append(f"{where}: activation item without rationale")
    if r.get("split") == "evaluation" and r.get("rationale"):
        problems.append(f"{where}: evaluation item has a rationale")
    story = r.get("story", "")
    cjk = sum(1 for c in story if "\u4e00" <= c <= "\u9fff") / max(1, len(story))
    if (r.get("lang") == "zh") != (cjk > 0.3):
        problems.append(f"{where}: language of story does not match lang={r.get('lang')}")
    a, v = r.get("aligned", ""), r.get("violating", "")
    if r.get("lang") == "zh":
        ok = 40 <= len(story) <= 220 and 6 <= len(a) <= 80 and 6 <= len(v) <= 80
    else:
        ok = 25 <= len(story.split()) <= 120 and 4 <= len(a.split()) <= 40 and 4 <= len(v.split()) <= 40
    if not ok:
        problems.append(f"{where}: story or action length outside the bounds")
    sentences = [x for x in re.split(r"[.!?。！？]+", story) if x.strip()]
    if not 2 <= len(sentences) <= 7:
        problems.append(f"{where}: story has {len(sentences)} sentences (2-7)")


def check_pairs(rows: list[dict], problems: list[str]) -> None:
    stems: dict[str, dict[str, dict]] = collections.defaultdict(dict)
    for r in rows:
        stems[re.sub(r"-(zh|en)$", "", r["id"])][r["lang"]] = r
    for stem, langs in stems.items():
        if set(langs) != {"zh", "en"}:
            problems.append(f"unpaired stem {stem}: {sorted(langs)}")
            continue
        zh, en = langs["zh"], langs["en"]
        for k in ("split", "setting", "value"):
            if zh.get(k) != en.get(k):
                problems.append(f"{stem}: {k} differs between zh and en")
        for k, (lo, hi) in (("story", STORY_RATIO), ("aligned", ACTION_RATIO), ("violating", ACTION_RATIO)):
            ratio = len(en.get(k, "")) / max(1, len(zh.get(k, "")))
            if not lo <= ratio <= hi:
                problems.append(f"{stem}: en/zh length ratio of {k} {ratio:.2f} outside [{lo}, {hi}]")


def check_spread(rows: list[dict], problems: list[str]) -> None:
    cells: dict[tuple, collections.Counter] = collections.defaultdict(collections.Counter)
    for r in rows:
        cells[(r["lang"], r["split"])][r.get("setting")] += 1
    for (lang, split), c in sorted(cells.items()):
        total = sum(c.values())
        print(f"{lang} {split}: {total} items; settings {dict(c.most_common())}")
        if len(c) < MIN_SETTINGS:
            problems.append(f"{lang} {split}: only {len(c)} distinct settings (want >= {MIN_SETTINGS})")
        top, n = c.most_common(1)[0]
        if total >= 20 and n / total > MAX_SETTING_SHARE:
            problems.append(f"{lang} {split}: setting {top!r} covers {n / total:.0%} (max {MAX_SETTING_SHARE:.0%})")


def check_balance(rows: list[dict], problems: list[str]) -> None:
    for lang in ("zh", "en"):
        sub = [r for r in rows if r["lang"] == lang]
        if sub:
            la = sum(len(r["aligned"]) for r in sub) / len(sub)
            lv = sum(len(r["violating"]) for r in sub) / len(sub)
            longer = sum(len(r["aligned"]) > len(r["violating"]) for r in sub) / len(sub)
            print(f"{lang}: mean aligned {la:.0f} chars, violating {lv:.0f} chars, aligned longer in {longer:.0%}")
            if not 0.85 < la / max(lv, 1) < 1.15 or not 0.3 < longer < 0.7:
                problems.append(f"{lang}: aligned/violating lengths not balanced")


def check_duplicates(path: pathlib.Path, rows: list[dict], problems: list[str]) -> None:
    mine = [(r["id"], r["lang"], grams(r["story"])) for r in rows]
    for (ia, la, a), (ib, lb, b) in itertools.combinations(mine, 2):
        j = len(a & b) / max(1, len(a | b))
        if la == lb and j >= 0.35:
            problems.append(f"near-duplicate stories {ia} / {ib}: 5-gram Jaccard {j:.2f} (must be < 0.5, aim < 0.35)")
    for other in sorted(path.parent.glob("*.jsonl")):
        if other.resolve() == path.resolve():
            continue
        theirs = [(r.get("id"), r.get("lang"), grams(r.get("story", ""))) for r in read(other, [])]
        for ia, la, a in mine:
            for ib, lb, b in theirs:
                j = len(a & b) / max(1, len(a | b))
                if la == lb and j >= 0.35:
                    problems.append(f"near-duplicate of {other.name}: {ia} / {ib}: 5-gram Jaccard {j:.2f}")


def main(path_s: str) -> int:
    path = pathlib.Path(path_s)
    problems: list[str] = []
    rows = read(path, problems)
    for r in rows:
        check_item(r, problems)
    ids = collections.Counter(r["id"] for r in rows)
    problems += [f"duplicate id {i}" for i, c in ids.items() if c > 1]
    print("counts:", dict(collections.Counter((r["lang"], r["split"]) for r in rows)))
    check_pairs(rows, problems)
    check_spread(rows, problems)
    check_balance(rows, problems)
    check_duplicates(path, rows, problems)
    for p in problems:
        print("PROBLEM:", p)
    print("OK" if not problems else f"{len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
