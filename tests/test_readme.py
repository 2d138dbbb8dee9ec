"""The README stays in step with the code: its two commands, the recipe table, the CLI."""
from pathlib import Path

from bnrewrite.registry import VARIANTS

README = (Path(__file__).parent.parent / "README.md").read_text()


def test_readme_starts_with_the_two_commands():
    head = README.split("\n")[:8]
    assert any(line.startswith("make demo") for line in head)
    assert any(line.startswith("make test") for line in head)


def test_every_registered_component_is_in_the_recipe_table():
    table = README.split("## Recipe reference", 1)[1].split("\n## ", 1)[0]
    for name in VARIANTS:
        assert f"| `{name}` |" in table, f"README recipe table lacks `{name}`"


def test_readme_is_assembled_from_its_sections():
    sections = sorted((Path(__file__).parent.parent / "docs" / "sections").glob("*.md"))
    for section in sections:
        first = section.read_text().strip().splitlines()[0]
        assert first in README, f"{section.name} not in README: run docs/assemble_readme.py"
