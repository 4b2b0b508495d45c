"""Quick self-check for one value's story file while writing it (counts, pairing, near-duplicates,
length balance). Usage: python tools/check_stories.py data/stories/<value>.jsonl"""
import collections
import itertools
import json
import re
import sys

REQUIRED = ("id", "value", "lang", "split", "story", "aligned", "violating")


def grams(text: str, n: int = 5) -> set[str]:
    t = re.sub(r"\s+", " ", text.lower())
    return {t[i : i + n] for i in range(max(1, len(t) - n + 1))}


def main(path: str) -> int:
    rows = []
    problems = []
    with open(path, encoding="utf-8") as fh:
        lines = fh.read().splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append(f"line {n}: bad JSON ({e})")
            continue
        miss = [k for k in REQUIRED if not r.get(k)]
        if miss:
            problems.append(f"line {n}: missing {miss}")
        if r.get("split") == "activation" and not r.get("rationale"):
            problems.append(f"line {n}: activation item without rationale")
        if r.get("split") == "evaluation" and r.get("rationale"):
            problems.append(f"line {n}: evaluation item has a rationale")
        cjk = sum(1 for c in r.get("story", "") if "\u4e00" <= c <= "\u9fff") / max(1, len(r.get("story", "")))
        if (r.get("lang") == "zh") != (cjk > 0.3):
            problems.append(f"line {n}: language of story does not match lang={r.get('lang')}")
        rows.append(r)
    ids = collections.Counter(r["id"] for r in rows)
    problems += [f"duplicate id {i}" for i, c in ids.items() if c > 1]
    stems = collections.defaultdict(set)
    for r in rows:
        stems[re.sub(r"-(zh|en)$", "", r["id"])].add(r["lang"])
    problems += [f"unpaired stem {s}: {sorted(langs)}" for s, langs in stems.items() if langs != {"zh", "en"}]
    count = collections.Counter((r["lang"], r["split"]) for r in rows)
    print("counts:", dict(count))
    by = collections.defaultdict(list)
    for r in rows:
        by[r["lang"]].append((r["id"], grams(r["story"])))
    for gs in by.values():
        for (ia, a), (ib, b) in itertools.combinations(gs, 2):
            j = len(a & b) / max(1, len(a | b))
            if j >= 0.35:
                problems.append(f"near-duplicate stories {ia} / {ib}: 5-gram Jaccard {j:.2f} (must be < 0.5, aim < 0.35)")
    for lang in ("zh", "en"):
        sub = [r for r in rows if r["lang"] == lang]
        if sub:
            la = sum(len(r["aligned"]) for r in sub) / len(sub)
            lv = sum(len(r["violating"]) for r in sub) / len(sub)
            longer = sum(len(r["aligned"]) > len(r["violating"]) for r in sub) / len(sub)
            print(f"{lang}: mean aligned {la:.0f} chars, violating {lv:.0f} chars, aligned longer in {longer:.0%}")
            if not 0.85 < la / max(lv, 1) < 1.15 or not 0.3 < longer < 0.7:
                problems.append(f"{lang}: aligned/violating lengths not balanced")
    for p in problems:
        print("PROBLEM:", p)
    print("OK" if not problems else f"{len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
