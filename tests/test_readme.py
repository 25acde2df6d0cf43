"""README.md stays true: every setting is documented, and the two commands are the ones CI runs."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from shared.settings import Settings, env_name, settings_table

ROOT = Path(__file__).resolve().parent.parent


def test_every_setting_is_in_the_readme_with_its_default() -> None:
    readme = (ROOT / "README.md").read_text()
    for spec in dataclasses.fields(Settings):
        assert f"`{env_name(spec.name)}`" in readme, f"{env_name(spec.name)} is not documented in README.md"
    # The Configuration table is exactly what the settings declare (defaults and meanings included). To
    # regenerate it: python -c "from shared.settings import settings_table; print(settings_table())"
    assert settings_table() in readme, "README's Configuration table differs from shared.settings.settings_table()"


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "./run-tests" in readme
    assert "exec ./run-tests" in ci
    assert "pricegate demo" in readme
