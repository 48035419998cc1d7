"""Regenerate the README's method sections from docs/*.md (headings demoted one level), between the
methods/toc markers. Edit docs/<area>.md, then run: python docs/merge_into_readme.py"""

import re
from pathlib import Path

repo = Path(__file__).resolve().parents[1]
readme = (repo / "README.md").read_text()
order = [
    ("ransac.md", "ransac"),
    ("selavpr.md", "selavpr"),
    ("fol.md", "fol"),
    ("sfrs.md", "sfrs"),
    ("localize.md", "localize"),
]
parts = []
toc = []
for name, _ in order:
    text = (repo / "docs" / name).read_text()
    out, fence = [], False
    for line in text.splitlines():
        if line.strip().startswith("```"):
            fence = not fence
        if not fence and re.match(r"^#{1,5} ", line):
            line = "#" + line
        out.append(line)
    title = next(l for l in out if l.startswith("## "))[3:]
    anchor = re.sub(r"[^a-z0-9 -]", "", title.lower()).replace(" ", "-")
    toc.append(f"- [{title}](#{anchor})")
    parts.append("\n".join(out).strip() + "\n")
block = "<!-- methods:start -->\n" + "\n".join(parts) + "<!-- methods:end -->\n"
if "<!-- methods:start -->" in readme:
    readme = re.sub(r"<!-- methods:start -->.*<!-- methods:end -->\n", block, readme, flags=re.S)
else:
    readme = readme.replace("## Layout and extending", block + "\n## Layout and extending")
toc_block = "<!-- toc:start -->\n" + "\n".join(toc) + "\n<!-- toc:end -->\n"
if "<!-- toc:start -->" in readme:
    readme = re.sub(r"<!-- toc:start -->.*<!-- toc:end -->\n", toc_block, readme, flags=re.S)
else:
    readme = readme.replace(
        "- [Layout and extending](#layout-and-extending)", toc_block + "- [Layout and extending](#layout-and-extending)"
    )
(repo / "README.md").write_text(readme)
print("merged", len(parts), "sections;", len(readme.splitlines()), "lines")
