"""The README stays true to the code: every registered method, model and command is documented."""

from pathlib import Path

from convlens.cli import cli
from convlens.kernels.registry import METHODS
from convlens.models.registry import MODELS

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def test_every_method_in_readme_table():
    for name in METHODS:
        assert f"| `{name}` |" in README, f"method {name} missing from the README's methods table"


def test_every_model_command_and_option_documented():
    for name in MODELS:
        assert f"`{name}`" in README, name
    names = cli.list_commands(None)
    assert len(names) >= 19
    section = README[README.index("## Command line"):README.index("## Guarantees")]
    for name in names:
        assert f"convlens {name}" in README, f"command {name} missing from the README"
        for p in cli.get_command(None, name).params:
            for opt in getattr(p, "opts", []) + getattr(p, "secondary_opts", []):
                if opt.startswith("--") and opt not in ("--help",):
                    assert opt in section, f"option {opt} of `convlens {name}` missing from the README's reference"


def test_schema_table_is_written_from_the_schema():
    from convlens.engine.schema import schema_table
    assert schema_table() in README, "run python benchmarks/readme_tables.py"


def test_every_guarantee_names_a_test_that_exists():
    import re
    section = README[README.index("## Guarantees"):README.index("## Filter visualisation")]
    named = set(re.findall(r"`(test_\w+)`", section))
    assert len(named) >= 15
    tests = "".join(p.read_text() for p in (Path(__file__).parent).rglob("test_*.py"))
    for t in named:
        assert f"def {t}(" in tests, f"the Guarantees section names {t}, which does not exist"


def test_two_setup_commands_present():
    assert "python3 -m venv .venv && .venv/bin/pip install -e . && .venv/bin/convlens" in README
    assert "python3 -m venv .venv && .venv/bin/pip install -e '.[test]' && .venv/bin/python -m pytest" in README
    ci = (Path(__file__).resolve().parent.parent / ".ci" / "run").read_text()
    assert "python3 -m venv .venv && .venv/bin/pip install -e '.[test]' && .venv/bin/python -m pytest" in ci
