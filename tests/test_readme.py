"""The README and docs/ stay true to the code: the generated blocks are current, every
registered method, metric, model and command is documented, every link resolves, every
guarantee names a test that exists, and the two set-up commands are there."""

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
DOCS = ROOT / "docs"


def make_docs():
    spec = importlib.util.spec_from_file_location("make_docs", ROOT / "tools" / "make_docs.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_generated_docs_are_current():
    # The models table builds every zoo model's graph (a minute): the slow tier checks it.
    m = make_docs()
    only = [marker for _, marker, _ in m.BLOCKS if marker != "models-table"]
    assert m.stale(only) == [], "run python tools/make_docs.py"


@pytest.mark.slow
def test_generated_models_table_is_current():
    assert make_docs().stale(["models-table"]) == [], "run python tools/make_docs.py"


def test_every_method_metric_model_and_command_is_documented():
    from convlens.cli import cli
    from convlens.kernels.metrics.registry import METRICS
    from convlens.kernels.registry import METHODS
    from convlens.models.registry import MODELS
    methods, metrics = (DOCS / "methods.md").read_text(), (DOCS / "metrics.md").read_text()
    assert all(f"| `{m}` |" in methods for m in METHODS)
    assert all(f"| `{m}`:" in metrics for m in METRICS)
    models = (DOCS / "models.md").read_text()
    assert all(f"`{m}`" in models for m in MODELS)
    ref = (DOCS / "cli.md").read_text()
    for name in cli.list_commands(None):
        assert f"### convlens {name}" in ref, name
        for p in cli.get_command(None, name).params:
            for opt in getattr(p, "opts", []) + getattr(p, "secondary_opts", []):
                assert not opt.startswith("--") or opt in ref, (name, opt)


def test_every_link_resolves_and_the_readme_has_its_contents():
    pages = {"README.md": README, **{f"docs/{p.name}": p.read_text() for p in DOCS.glob("*.md")}}
    for name, text in pages.items():
        for target in re.findall(r"\]\(([^)#\s]+\.md)(?:#[^)]*)?\)", text):
            assert (ROOT / Path(name).parent / target).resolve().exists(), (name, target)
    anchors = {re.sub(r"[^a-z0-9 -]", "", h.lower()).replace(" ", "-") for h in re.findall(r"^## (.+)$", README, re.M)}
    for anchor in re.findall(r"\]\(#([^)]+)\)", README):
        assert anchor in anchors, anchor
    assert len(README.splitlines()) <= 260, "the README keeps the pitch, the recipes and links: the rest is in docs/"


def test_every_guarantee_names_a_test_that_exists():
    section = (DOCS / "guarantees.md").read_text()
    named = set(re.findall(r"`(test_\w+)`", section))
    assert len(named) >= 15
    tests = "".join(p.read_text() for p in Path(__file__).parent.rglob("test_*.py"))
    for t in named:
        assert f"def {t}(" in tests, f"docs/guarantees.md names {t}, which does not exist"


def test_two_setup_commands_present():
    assert "python3 -m venv .venv && .venv/bin/pip install -e . && .venv/bin/convlens" in README
    assert "python3 -m venv .venv && .venv/bin/pip install -e '.[test]' && .venv/bin/python -m pytest" in README
    ci = (ROOT / ".ci" / "run").read_text()
    assert "python3 -m venv .venv && .venv/bin/pip install -e '.[test]' && .venv/bin/python -m pytest" in ci


def test_version_is_one_everywhere(capsys):
    """`convlens --version` prints the version stores record."""
    import convlens
    from convlens.cli import main
    try:
        main(["--version"])
    except SystemExit as e:
        assert e.code in (0, None)
    assert f"convlens, version {convlens.__version__}" in capsys.readouterr().out
