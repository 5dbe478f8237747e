"""The README stays true to the code: every registered method, model and command is documented."""

from pathlib import Path

from convlens.cli import cli
from convlens.kernels.registry import METHODS
from convlens.models.registry import MODELS

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def test_every_method_in_readme_table():
    for name in METHODS:
        assert f"| `{name}` |" in README, f"method {name} missing from the README's methods table"


def test_every_model_and_command_documented():
    for name in MODELS:
        assert f"`{name}`" in README, name
    for name in cli.commands:
        assert f"convlens {name}" in README, f"command {name} missing from the README"


def test_two_setup_commands_present():
    assert "python3 -m venv .venv && .venv/bin/pip install -e . && .venv/bin/convlens" in README
    assert "python3 -m venv .venv && .venv/bin/pip install -e '.[test]' && .venv/bin/python -m pytest" in README
    ci = (Path(__file__).resolve().parent.parent / ".ci" / "run").read_text()
    assert "python3 -m venv .venv && .venv/bin/pip install -e '.[test]' && .venv/bin/python -m pytest" in ci
