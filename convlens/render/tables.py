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
        q = e.get("quality") or {}
        if q:
            lines.append("  quality: " + ", ".join(f"{m} {v['mean']:.3f} [{v['ci'][0]:.3f}, {v['ci'][1]:.3f}]"
                                                   for m, v in q.items() if np.isfinite(v["mean"])))
        flags = e["flags"]
        if not flags:
            lines.append("  no flags")
        for fl in flags:
            lines.append(f"  FLAG {fl['kind']}: {fl['why']}")
        for item in s.get("most_suspicious", [])[:3]:
            lines.append(f"  suspicious: {item['id']} (score {item['suspicion']:.2f})")
    return "\n".join(lines)


def compare_table(path) -> str:
    """The methods of an audited store: their cost from the run's own timing, then every
    quality metric with its interval, whether it is informative on this store, and the
    one ranking over the informative metrics."""
    root = store.open_store(path)
    a = root.attrs.get("audit")
    if not a:
        raise ConvlensError(f"{path} has not been audited: run `convlens audit {path}` first")
    cost = (root.attrs.get("run") or {}).get("method_seconds_per_item", {})
    lines = ["Cost (seconds per item, from the run): " + ", ".join(
        f"{m} {cost[m]:.4f}" if m in cost else f"{m} -" for m in a["methods"])]
    q = a.get("quality") or {}
    if q.get("scores"):
        lines += ["", quality_table(q)]
    else:
        why = q.get("skipped") or "the audit computed none (--quality none)"
        lines += ["", f"No quality metrics to rank the methods by: {why}."]
    return "\n".join(lines)


def quality_table(q: dict) -> str:
    """The catalogue metrics: each source's mean and 95% bootstrap interval per metric,
    which metrics are informative on this store, and the ranking over those."""
    sources = list(q["scores"])
    controls = "controls: a random map and a Sobel edge map of the input" if q.get("controls", True) else \
        "no controls (--no-controls): no metric can be judged informative"
    lines = [f"Quality metrics on {q['items']} items (mean [95% bootstrap interval]); {controls}"]
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
