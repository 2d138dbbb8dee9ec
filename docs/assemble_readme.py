"""README.md = docs/README.head.md + docs/sections/*.md in name order. Run after editing a section."""
from pathlib import Path

here = Path(__file__).parent
parts = [(here / "README.head.md").read_text()]
parts += [p.read_text() for p in sorted((here / "sections").glob("*.md"))]
(here.parent / "README.md").write_text("\n".join(part.rstrip() + "\n" for part in parts))
