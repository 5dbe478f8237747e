"""``convlens report STORE --out report.html``: a browsable HTML report of a store.

One page (plus gallery pages for large stores, ``per_page`` items each) that needs no
network: the pictures are PNG files in a sibling folder ``<name>_files/`` drawn by
`convlens.render.render`. Sections: the model (its layer table), the run (data,
configuration, timing, failures), a visual log of the input pipeline, the audit's
findings with their evidence and the ranking of methods, and galleries per method.
Each page checks that its images loaded and records it in ``<body data-images>``.
"""

from __future__ import annotations

import html
import shutil
from pathlib import Path

import numpy as np

from convlens.engine import schema, store
from convlens.engine.ownership import claim_folder
from convlens.errors import ConvlensError
from convlens.render import images as im
from convlens.render.render import (RENDER_MARKER, RenderOptions, ReportOptions, _done_items, class_names_of,
                                    heatmap_methods, item_panel, render_store)

REPORT_MARKER = ".convlens-report"
GENERATOR = "<meta name='generator' content='convlens report'>"


def check_ours(page: Path) -> None:
    """Refuses to overwrite an existing file that is not a page of a convlens report."""
    if page.is_symlink() or page.is_dir():
        raise ConvlensError(f"report --out {page} is not a file path; give a new .html file")
    if page.exists():
        try:
            head = page.read_text(encoding="utf-8", errors="replace")[:2000]
        except OSError:
            head = ""
        if GENERATOR not in head:
            raise ConvlensError(f"report --out {page} is an existing file convlens did not write; choose another path")

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0 auto;max-width:1200px;padding:0 16px;
color:#222}
h1{font-size:1.5em}h2{font-size:1.2em;border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:2em}
pre{background:#f6f6f6;padding:8px;overflow-x:auto;font-size:12px}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ddd;padding:3px 8px;text-align:left}
.flag{background:#fff3f3;border-left:4px solid #d33;padding:6px 10px;margin:6px 0}
.ok{background:#f3fff3;border-left:4px solid #3a3;padding:6px 10px;margin:6px 0}
img{max-width:100%;height:auto;image-rendering:pixelated}.nav a{margin-right:10px}
"""

CHECK = """<script>
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  document.body.setAttribute('data-images', ok + '/' + imgs.length);
});
</script>"""


def _page(title: str, body: str) -> str:
    return (f"<!doctype html><html lang='en'><head><meta charset='utf-8'>{GENERATOR}<title>{html.escape(title)}</title>"
            f"<style>{CSS}</style></head><body data-images='pending'>{body}{CHECK}</body></html>")


def _img(src: str, alt: str) -> str:
    return f"<p><img src='{html.escape(src)}' alt='{html.escape(alt)}'></p>"


def _table(rows, head=None) -> str:
    h = "" if head is None else "<tr>" + "".join(f"<th>{html.escape(str(c))}</th>" for c in head) + "</tr>"
    return "<table>" + h + "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>"
                                   for r in rows) + "</table>"


def report(path, out, opts: ReportOptions | None = None, **kw) -> list[Path]:
    """Writes the report for the store at ``path`` to ``out`` (an .html file); returns the
    pages. ``opts``: `ReportOptions` (or its fields as keywords)."""
    from convlens.config import build
    o = opts if opts is not None else build(ReportOptions, kw)
    out = Path(out)
    files_dir = out.with_name(out.stem + "_files")
    from convlens.engine.verify import require_sound
    root = store.open_store(path)
    require_sound(store.open_store(path, consolidated=False), path)
    check_ours(out)
    if files_dir.is_dir() and not files_dir.is_symlink() and (files_dir / REPORT_MARKER).exists():
        shutil.rmtree(files_dir)  # the pictures of an earlier report of ours: drawn again
    claim_folder(files_dir, REPORT_MARKER, "the report's picture folder")
    (files_dir / RENDER_MARKER).write_text("written by convlens\n")
    a = dict(root.attrs)
    groups = render_store(path, files_dir, RenderOptions(o.cmap, o.style, o.alpha, o.limit, video="webm"))

    def src(p: Path) -> str:
        return f"{files_dir.name}/{p.relative_to(files_dir).as_posix()}"
    body = [f"<h1>convlens report: {html.escape(str(a.get('model')))}</h1>",
            f"<p>Store <code>{html.escape(str(path))}</code>, written {html.escape(str(a.get('created')))} by "
            f"convlens {html.escape(str(a.get('convlens_version')))} (<code>{html.escape(str(a.get('command')))}"
            "</code>).</p>"]
    body += _findings(path, a, groups, src)  # findings first: what a reader came for
    body += _run(root, a)
    if groups.get("pipeline"):
        body.append("<h2>Input pipeline</h2><p>The first items as read, as resized for the model, and as the model "
                    "sees them after preprocessing (each channel stretched for display): a broken pipeline shows "
                    "here at once.</p>")
        body.append(_img(src(groups["pipeline"][0]), "input pipeline"))
    if a.get("model_summary"):
        body.append(f"<h2>Model</h2><pre>{html.escape(a['model_summary'])}</pre>")
    body += _training(a, groups, src) + _video(a, groups, src)
    pages: list[Path] = []
    if heatmap_methods(root) and "inputs" in root and not groups.get("training"):
        body += _galleries(root, out, files_dir, groups, src, o, pages)
    for group in ("activations", "weights", "atlas"):
        if groups.get(group):
            body.append(f"<h2>{group.capitalize()}</h2>")
            body += [_img(src(p), p.stem) for p in groups[group][:60]]
            if len(groups[group]) > 60:
                body.append(f"<p>… and {len(groups[group]) - 60} more pictures in <code>{files_dir.name}/{group}/"
                            "</code>.</p>")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(_page(f"convlens report: {a.get('model')}", "".join(body)), encoding="utf-8")
    return [out, *pages]


def _findings(path, a: dict, groups: dict, src) -> list[str]:
    audit = a.get("audit")
    body = ["<h2>Findings</h2>"]
    if not audit:
        return body + ["<p>No audit yet: <code>convlens audit STORE</code> adds shortcut flags and quality metrics "
                       "to this report.</p>"]
    flags = [(m, f) for m, e in audit["methods"].items() for f in e["flags"]]
    body += [f"<div class='flag'><b>{html.escape(m)}: {html.escape(f['kind'])}</b> — {html.escape(f['why'])}</div>"
             for m, f in flags] or ["<div class='ok'>The audit raised no flag.</div>"]
    from convlens.render.tables import compare_table
    body.append("<p>The quality metrics of each method and of two controls with their 95% intervals, whether each "
                "is informative on this store (some method beats the random map), and the ranking over the "
                f"informative ones:</p><pre>{html.escape(compare_table(path))}</pre>")
    body += [_img(src(p), p.stem) for p in groups.get("audit", [])]
    rows = []
    for m, e in audit["methods"].items():
        s = e["summary"]
        rows.append([m, s["items"], f"{s.get('empty_maps', 0)} of {s.get('maps', s['items'])}",
                     f"{s['mean_center_share']:.2f}", f"{s['mean_entropy']:.2f}",
                     f"{s.get('accuracy', float('nan')):.3f}", f"{s.get('pointing_game', float('nan')):.2f}"])
    body.append(_table(rows, ["method", "items", "empty maps", "centre share", "entropy", "accuracy",
                              "pointing game"]))
    return body


def _run(root, a: dict) -> list[str]:
    run = a.get("run") or {}
    rows = [["model", f"{a.get('model')} ({a.get('model_source')})"], ["weights sha256", a.get("weights_sha256")],
            ["input", f"{a.get('input_size')}, preprocessing {a.get('preprocessing')}"],
            ["data", a.get("source", "-")], ["resize", a.get("resize", "-")], ["target", a.get("target", "-")]]
    if run:
        rows += [["items", f"{run.get('done')} done, {run.get('failed')} failed of {run.get('items')}"],
                 ["time", f"{run.get('seconds', 0):.1f} s ({run.get('items_per_second', 0):.2f} items/s, "
                          f"{run.get('processes', 1)} process(es))"]]
        rows += [[f"cost of {m}", f"{secs * 1000:.1f} ms per item"]
                 for m, secs in (run.get("method_seconds_per_item") or {}).items()]
    body = ["<h2>Run</h2>", _table(rows)]
    methods = a.get("methods") or {}
    if methods:
        body.append(_table([[m, ", ".join(f"{k}={v}" for k, v in e.get("config", {}).items()),
                             ", ".join(f"{k} ({', '.join(d)})" for k, d in e.get("outputs", {}).items())]
                            for m, e in methods.items()], ["method", "configuration", "outputs"]))
    if "status" in root and (np.asarray(root["status"][:]) == schema.FAILED).any():
        st = np.asarray(root["status"][:])
        bad = np.flatnonzero(st == schema.FAILED)[:50]
        body.append(f"<p>{int((st == schema.FAILED).sum())} items failed:</p>")
        body.append(_table([[root["ids"][i], root["errors"][i]] for i in bad], ["item", "reason"]))
    return body


def _training(a: dict, groups: dict, src) -> list[str]:
    if not groups.get("training"):
        return []
    tr = a.get("training") or {}
    secs = tr.get("record_seconds") or []
    body = ["<h2>Training</h2><p>Explanations of the same images after each recorded epoch "
            f"({', '.join(map(str, tr.get('epochs', [])))}): each strip runs left to right through training; the "
            "animations play the epochs. " + (f"Recording took {np.mean(secs[1:] or secs):.2f} s per epoch "
                                             f"({secs[0]:.2f} s the first time, with compilation).</p>" if secs
                                             else "</p>")]
    body += [_img(src(p), p.stem) for p in groups["training"] if p.suffix == ".gif" or p.name == "metrics.png"]
    body += [_img(src(p), f"{p.parent.name} {p.stem}") for p in groups["training"]
             if p.suffix == ".png" and p.name != "metrics.png"]
    return body


def _video(a: dict, groups: dict, src) -> list[str]:
    if not groups.get("video"):
        return []
    v = a.get("video") or {}
    files = ", ".join(html.escape(Path(f).name) for f in v.get("files", []))
    body = ["<h2>Video</h2><p>Every explained frame with its map, at the frames' own times "
            f"(every {v.get('every', 1)} frame(s) of {files}); the galleries below show each frame.</p>"]
    body += [f"<p><b>{html.escape(p.stem)}</b><br><video controls loop muted src='{html.escape(src(p))}' "
             "style='max-width:100%'></video></p>" for p in groups["video"]]
    return body


def _galleries(root, out: Path, files_dir: Path, groups: dict, src, o, pages: list) -> list[str]:
    """Contact sheets here, and every item on paginated pages of ``o.per_page``."""
    body = ["<h2>Galleries</h2>"]
    body += [_img(src(p), p.stem) for p in groups.get("overlays", []) if p.stem.endswith("_contact")]
    items = _done_items(root)
    per_page = o.per_page
    n_pages = -(-len(items) // per_page)
    names, hm = class_names_of(root), heatmap_methods(root)
    links = []
    for k in range(n_pages):
        page_file = out.with_name(f"{out.stem}-items-{k + 1}.html")
        check_ours(page_file)
        blocks = []
        for i in items[k * per_page:(k + 1) * per_page]:
            p = files_dir / "items" / f"{i}.png"
            if not p.exists():
                im.save_png(item_panel(root, int(i), hm, names, o.cmap, o.alpha, o.style), p)
            blocks.append(_img(src(p), f"item {i}"))
        nav = (f"<p class='nav'><a href='{out.name}'>report</a>"
               + (f"<a href='{out.stem}-items-{k}.html'>previous</a>" if k else "")
               + (f"<a href='{out.stem}-items-{k + 2}.html'>next</a>" if k + 1 < n_pages else "") + "</p>")
        page_file.write_text(_page(f"items {k + 1}/{n_pages}", nav + f"<h1>Items, page {k + 1} of {n_pages}</h1>"
                                   + "".join(blocks) + nav), encoding="utf-8")
        pages.append(page_file)
        links.append(f"<a href='{page_file.name}'>{k * per_page}–{min(len(items), (k + 1) * per_page) - 1}</a>")
    body.append("<p class='nav'>Every item, method by method: " + " ".join(links) + "</p>")
    return body
