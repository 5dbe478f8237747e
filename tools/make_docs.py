"""Writes the generated parts of the docs from the registries and the benchmark results:
each between ``<!-- NAME -->`` and ``<!-- /NAME -->`` markers of its page, so a page can be
generated whole (the CLI reference) or hold a generated table in written text (the flag
rules in the audits page). ``tests/test_readme.py`` fails when a block is stale.

    python tools/make_docs.py
"""

from __future__ import annotations

import dataclasses
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def cli_reference() -> str:
    """Every command's ``--help``, as click prints it."""
    import click

    from convlens.cli import COMMANDS
    out = []
    for name, (_, build) in COMMANDS.items():
        cmd = build()
        ctx = click.Context(cmd, info_name=f"convlens {name}", terminal_width=110, max_content_width=110)
        out += [f"### convlens {name}", "", "```", cmd.get_help(ctx).rstrip(), "```", ""]
    return "\n".join(out).rstrip()


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def methods_table() -> str:
    from convlens.config import field_help
    from convlens.kernels.registry import METHODS
    rows = ["| method | family | what | outputs (dims) | options (default): meaning |", "|---|---|---|---|---|"]
    for name in sorted(METHODS, key=lambda m: (METHODS[m].family, m)):
        spec = METHODS[name]
        helps = field_help(spec.config)
        opts = "; ".join(f"`{f.name}` ({f.default!r}): {helps.get(f.name, '')}" for f in
                         dataclasses.fields(spec.config) if not f.name.startswith("_")) or "—"
        outs = ", ".join(f"`{o.name}` ({', '.join(o.dims)})" for o in spec.outputs)
        rows.append(f"| `{name}` | {spec.family} | {_cell(spec.doc)} | {outs} | {_cell(opts)} |")
    return "\n".join(rows)


def metrics_table() -> str:
    from convlens.kernels.metrics.registry import FAMILIES, METRICS, PRESETS, options_help
    out = []
    for fam in FAMILIES:
        out += [f"#### {fam}", "", "| metric | better | needs besides maps | options (default) |", "|---|---|---|---|"]
        for name, spec in METRICS.items():
            if spec.family != fam:
                continue
            opts = ", ".join(f"`{o}` ({d!r})" for o, d, _ in options_help(name))
            needs = ", ".join(spec.requires) or "—"
            if not spec.per_item:
                needs += " (the set of items)"
            out.append(f"| `{name}`: {_cell(spec.doc)} | {spec.direction} | {needs} | {_cell(opts)} |")
        out.append("")
    out += ["Presets: " + "; ".join(f"`{p}` = {', '.join(names)}" for p, names in PRESETS.items()) + "."]
    return "\n".join(out)


def departures() -> str:
    from convlens.kernels.metrics.registry import METRICS
    return "\n".join(f"* `{n}`: {s.departure}." for n, s in METRICS.items() if s.departure)


def models_table() -> str:
    from readme_tables import models
    return models()


def schema_table() -> str:
    from convlens.engine.schema import schema_table
    return schema_table()


def flag_rules() -> str:
    from convlens.engine.audit import FLAG_RULES, AuditConfig
    defaults = {f.name: f.default for f in dataclasses.fields(AuditConfig)}

    def with_defaults(text):
        return re.sub(r"`(\w+)`", lambda m: f"`{m.group(1)}` ({defaults[m.group(1)]})" if m.group(1) in defaults
                      else m.group(0), text)
    return "\n".join(f"* `{r.kind}` — {with_defaults(r.when)}." for r in FLAG_RULES)


def benchmark(name: str):
    def table():
        import readme_tables
        fn = {"forward": readme_tables.forward, "explain": readme_tables.explain,
              "occlusion": readme_tables.occlusion, "ascent": readme_tables.ascent, "engine": readme_tables.engine,
              "metrics": readme_tables.metrics_cost, "callback": readme_tables.callback,
              "shared": readme_tables.shared, "quality": readme_tables.quality,
              "perturbation": readme_tables.perturbation, "video": readme_tables.video,
              "precision": readme_tables.precision, "layers": readme_tables.layers,
              "incremental": readme_tables.incremental_curves, "readme-models": readme_tables.model_summary,
              "readme-layers": lambda: readme_tables.layers(worst=6)}[name]
        return fn() or "(not measured yet)"
    return table


# (page, marker, generator)
BLOCKS = [
    ("cli.md", "cli-reference", cli_reference),
    ("methods.md", "methods-table", methods_table),
    ("metrics.md", "metrics-table", metrics_table),
    ("metrics.md", "departures", departures),
    ("models.md", "models-table", models_table),
    ("store.md", "schema-table", schema_table),
    ("audits.md", "flag-rules", flag_rules),
    *[("benchmarks.md", f"{n}-table", benchmark(n)) for n in (
        "forward", "explain", "occlusion", "perturbation", "video", "ascent", "engine", "callback", "metrics",
        "shared", "quality", "precision", "layers", "incremental")],
    ("../README.md", "readme-models", benchmark("readme-models")),
    ("../README.md", "readme-layers", benchmark("readme-layers")),
]


def _pattern(marker: str):
    return re.compile(f"<!-- {marker} -->\n.*?<!-- /{marker} -->", re.S)


def stale(only=None) -> list[str]:
    """The blocks whose page text differs from what they generate now."""
    out = []
    for page, marker, fn in BLOCKS:
        if only and marker not in only:
            continue
        text = (DOCS / page).read_text()
        want = f"<!-- {marker} -->\n{fn()}\n<!-- /{marker} -->"
        m = _pattern(marker).search(text)
        if m is None or m.group(0) != want:
            out.append(f"docs/{page}: {marker}")
    return out


def main():
    for page, marker, fn in BLOCKS:
        path = DOCS / page
        text = path.read_text()
        if not _pattern(marker).search(text):
            print(f"docs/{page} has no {marker} markers; skipped")
            continue
        block = fn()
        text = _pattern(marker).sub(lambda m: f"<!-- {marker} -->\n{block}\n<!-- /{marker} -->", text)
        path.write_text(text)
        print(f"docs/{page}: {marker}")


if __name__ == "__main__":
    main()
