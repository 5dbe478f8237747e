"""Tables of an audit's findings, read from a store (no JAX): what ``convlens audit`` and
``convlens compare`` print and the report shows."""

from __future__ import annotations

import numpy as np

from convlens.engine import store
from convlens.errors import ConvlensError


def table(findings: dict) -> str:
    """A concise table of an audit's findings."""
    lines = []
    for method, e in findings.items():
        s = e["summary"]
        f = e.get("faithfulness") or {}
        maps = s.get("maps", s["items"])
        head = f"{method}: {s['items']} items" + (f" ({maps} maps: one per explained label)" if maps != s["items"]
                                                  else "") + \
            f", centre share {s['mean_center_share']:.2f}, entropy {s['mean_entropy']:.2f}"
        if s.get("empty_maps"):
            head += f", {s['empty_maps']} of {maps} maps empty or constant"
        if "accuracy" in s:
            head += f", accuracy {s['accuracy']:.2f}"
        if "pointing_game" in s:
            head += f", pointing game {s['pointing_game']:.2f}, object share {s['mean_object_share']:.2f}"
        lines.append(head)
        if "deletion_auc" in f:
            lines.append(f"  faithfulness ({f['items']} items): deletion AUC {f['deletion_auc']:.3f}, insertion AUC "
                         f"{f['insertion_auc']:.3f}, average drop {f['average_drop']:.1%}, increase "
                         f"{f['increase_in_confidence']:.1%}")
        san = e.get("sanity") or {}
        if "rank_correlation" in san:
            lines.append("  sanity: rank correlation as layers are randomised top-down: "
                         + ", ".join(f"{c}: {r:.2f}" for c, r in zip(san["layers_randomised"], san["rank_correlation"])))
        flags = e["flags"]
        if not flags:
            lines.append("  no flags")
        for fl in flags:
            lines.append(f"  FLAG {fl['kind']}: {fl['why']}")
        for item in s.get("most_suspicious", [])[:3]:
            lines.append(f"  suspicious: {item['id']} (score {item['suspicion']:.2f})")
    return "\n".join(lines)


def compare_table(path) -> str:
    """Methods of an audited store ranked by faithfulness (insertion AUC - deletion AUC),
    with their cost from the run's own timing."""
    root = store.open_store(path)
    a = root.attrs.get("audit")
    if not a:
        raise ConvlensError(f"{path} has not been audited: run `convlens audit {path}` first")
    cost = (root.attrs.get("run") or {}).get("method_seconds_per_item", {})
    rows = []
    for m, e in a["methods"].items():
        f = e.get("faithfulness") or {}
        san = e.get("sanity") or {}
        score = f.get("insertion_auc", np.nan) - f.get("deletion_auc", np.nan)
        rows.append((score, m, f, san, cost.get(m)))
    rows.sort(key=lambda r: -np.nan_to_num(r[0], nan=-np.inf))
    head = f"{'rank':4s} {'method':22s} {'ins-del':>8s} {'deletion':>9s} {'insertion':>10s} {'avg drop':>9s} " \
           f"{'increase':>9s} {'sanity rho':>10s} {'s/item':>8s}"
    lines = [head, "-" * len(head)]
    for i, (score, m, f, san, c) in enumerate(rows, 1):
        rho = san.get("rank_correlation", [np.nan])[-1]
        flag = " (fails sanity)" if san.get("flagged") else ""

        def fmt(v, spec):
            return format(v, spec) if v is not None and np.isfinite(v) else "-"
        lines.append(f"{i:<4d} {m:22s} {fmt(score, '8.3f'):>8s} {fmt(f.get('deletion_auc'), '9.3f'):>9s} "
                     f"{fmt(f.get('insertion_auc'), '10.3f'):>10s} {fmt(f.get('average_drop'), '9.1%'):>9s} "
                     f"{fmt(f.get('increase_in_confidence'), '9.1%'):>9s} {fmt(rho, '10.2f'):>10s} "
                     f"{fmt(c, '8.4f'):>8s}{flag}")
    if a.get("quality") and a["quality"].get("scores"):
        lines += ["", quality_table(a["quality"])]
    return "\n".join(lines)


def quality_table(q: dict) -> str:
    """The catalogue metrics: each source's mean and 95% bootstrap interval per metric,
    which metrics are informative on this store, and the ranking over those."""
    sources = list(q["scores"])
    lines = [f"Quality metrics on {q['items']} items (mean [95% bootstrap interval]); controls: a random map and "
             "a Sobel edge map of the input"]
    head = f"{'metric':26s} {'better':6s} " + " ".join(f"{s:>22s}" for s in sources) + "  verdict"
    lines += [head, "-" * len(head)]
    for m in q["metrics"]:
        cells = []
        for s in sources:
            v = q["scores"][s].get(m)
            cells.append(f"{v['mean']:7.3f} [{v['ci'][0]:6.3f},{v['ci'][1]:6.3f}]" if v and np.isfinite(v["mean"])
                         else "-")
        verdict = "informative" if q["informative"][m]["informative"] else "uninformative here"
        lines.append(f"{m:26s} {'higher' if q['higher_is_better'][m] else 'lower':6s} "
                     + " ".join(f"{c:>22s}" for c in cells) + f"  {verdict}")
    if q.get("skipped_without_masks"):
        lines.append(f"skipped (the store has no object masks): {', '.join(q['skipped_without_masks'])}")
    used = [m for m in q["metrics"] if q["informative"][m]["informative"]]
    if not used:
        lines += ["", "No metric separates the methods from the random map on this store: no ranking."]
        return "\n".join(lines)
    lines += ["", "Ranking (mean rank over the informative metrics: " + ", ".join(used) + "):"]
    for i, r in enumerate(q["ranking"], 1):
        mr = r["mean_rank"]
        lines.append(f"  {i}. {r['source']:22s} mean rank " +
                     (f"{mr:.2f}" if isinstance(mr, (int, float)) and np.isfinite(mr) else "-"))
    return "\n".join(lines)
