"""How well attribution predicts ablation on a real model: for a sample of neurons, the attribution
``-act x d(margin)/d(act)`` summed over the story tokens of each item (what ``vstore build
--attribution`` stores) against the margin change measured when that neuron alone is zeroed there.

    python tools/check_attribution.py --model gemma3-270m --data data/stories.jsonl --sample 64 \\
        [--scorer ll|choice] [--site act] [--split evaluation] [--limit 24] [--seed 0] [--json FILE]

Half the sample is the neurons of largest total |attribution|, half drawn uniformly (``--draw
random`` draws them all uniformly): uniform neurons alone are mostly near zero, where rank
correlations measure noise. Prints the Spearman and Pearson correlations over the sampled neurons
(totals over the items) and over (neuron, item) pairs, the sign agreement, and the error.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vstore.attribution import attribute_batch, measure_zeroing
from vstore.data import load_stories
from vstore.models import load_model


def _ranks(x: np.ndarray) -> np.ndarray:
    try:
        from scipy.stats import rankdata

        return np.asarray(rankdata(x), dtype=np.float64)
    except ImportError:  # ties broken by order
        r = np.empty(len(x))
        r[np.argsort(x, kind="stable")] = np.arange(len(x))
        return r


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) < 2 or np.std(a) == 0 or np.std(b) == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def agreement(attr: np.ndarray, change: np.ndarray) -> dict[str, float]:
    """Agreement of attribution with the measured change, both (neurons, items)."""
    ta, tc = attr.sum(axis=1), change.sum(axis=1)
    big = np.abs(tc) > 0
    return {
        "spearman_neurons": _corr(_ranks(ta), _ranks(tc)),
        "pearson_neurons": _corr(ta, tc),
        "spearman_pairs": _corr(_ranks(attr.ravel()), _ranks(change.ravel())),
        "sign_agreement": float((np.sign(ta[big]) == np.sign(tc[big])).mean()) if big.any() else float("nan"),
        "max_abs_error": float(np.abs(attr - change).max()),
        "max_abs_change": float(np.abs(change).max()),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="alias, .gguf, folder or hub id")
    p.add_argument("--data", required=True, help="story file (both actions per item)")
    p.add_argument("--sample", type=int, required=True, help="neurons to zero one at a time")
    p.add_argument("--scorer", choices=("ll", "choice"), default="ll")
    p.add_argument("--site", default="act", help="act, down_in or resid (default act)")
    p.add_argument("--split", default="evaluation", help="stories of this split ('all': every split)")
    p.add_argument("--limit", type=int, default=24, help="items (default 24)")
    p.add_argument("--draw", choices=("mixed", "random"), default="mixed",
                   help="mixed: half the largest |attribution|, half uniform (default); random: all uniform")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the numbers as JSON")
    a = p.parse_args(argv)

    stories = [s for s in load_stories(a.data) if a.split == "all" or s.split == a.split][: a.limit]
    if not stories:
        p.error(f"no stories of split {a.split!r} in {a.data}")
    lm = load_model(a.model, device=a.device, progress=lambda m: print(m, file=sys.stderr))
    t0 = time.perf_counter()
    totals: list[np.ndarray] = []  # per batch: (items, layers, neurons), summed over story tokens
    for b in range(0, len(stories), a.batch_size):
        res = attribute_batch(lm.model, lm.tokenizer, stories[b : b + a.batch_size], a.scorer, site=a.site)
        layers = sorted(res.attr)
        totals.append(np.stack([res.attr[k].sum(dim=1).cpu().numpy() for k in layers], axis=1))
    per_item = np.concatenate(totals).astype(np.float64)  # (items, L, N)
    t_attr = time.perf_counter() - t0
    L, N = per_item.shape[1:]
    rng = np.random.default_rng(a.seed)
    flat = np.abs(per_item.sum(axis=0)).ravel()
    n_top = a.sample // 2 if a.draw == "mixed" else 0
    top = list(np.argsort(-flat, kind="stable")[:n_top])
    rest = np.setdiff1d(np.arange(L * N), top)
    picked = top + list(rng.choice(rest, size=min(a.sample - n_top, len(rest)), replace=False))
    neurons = [(layers[i // N], int(i % N)) for i in picked]
    t1 = time.perf_counter()
    _, change = measure_zeroing(lm.model, lm.tokenizer, stories, a.scorer, neurons, site=a.site,
                                batch_size=a.batch_size)
    t_zero = time.perf_counter() - t1
    attr = np.stack([per_item[:, layers.index(lay), n] for lay, n in neurons])  # (sample, items)
    out = {"model": a.model, "data": str(a.data), "scorer": a.scorer, "site": a.site, "items": len(stories),
           "sample": len(neurons), "draw": a.draw, "seed": a.seed, **agreement(attr, change),
           "seconds": {"attribution_all_neurons": t_attr, "zeroing_sample": t_zero}}
    if a.draw == "mixed" and n_top and len(neurons) - n_top >= 2:
        out["random_half"] = agreement(attr[n_top:], change[n_top:])
    out["neurons"] = [{"layer": lay, "neuron": n, "attribution": float(attr[j].sum()), "zeroing": float(change[j].sum())}
                      for j, (lay, n) in enumerate(neurons)]
    for k in ("spearman_neurons", "pearson_neurons", "spearman_pairs", "sign_agreement"):
        print(f"{k:>18}: {out[k]:.3f}")
    if "random_half" in out:
        print(f"{'random half':>18}: Spearman {out['random_half']['spearman_neurons']:.3f} over "
              f"{len(neurons) - n_top} uniform neurons")
    print(f"{'max |error|':>18}: {out['max_abs_error']:.3e} (max |change| {out['max_abs_change']:.3e})")
    print(f"{len(neurons)} neurons x {len(stories)} items, {a.scorer} margin, site {a.site}; attribution of all "
          f"{L * N} neurons {t_attr:.1f} s, zeroing the sample {t_zero:.1f} s")
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
