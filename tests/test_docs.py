"""The README and the documentation site keep their promises: short, about the product, and equal to the code.

(That every example in them runs is tests/test_readme.py; that every link and anchor resolves is the
strict `mkdocs build` in scripts/test.)
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Any

from receiver.openapi import openapi_document

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").rglob("*.md"))]
# A commit hash: 7 to 40 hex digits, with at least one letter and one digit (so no plain word or number).
COMMIT = re.compile(r"(?<![\w/.:-])(?=[0-9a-f]*[a-f])(?=[0-9a-f]*[0-9])[0-9a-f]{7,40}(?![\w/-])")
ISSUE = re.compile(r"\bissues?\s+#?\d+|(?<![\w&/#])#\d+\b|\bcommit\s+`?[0-9a-f]{7}", re.I)
# The variables receiver/config.py reads: quoted names, and the per-provider pacing suffixes.
VARIABLE = re.compile(r"\b(?:RECEIVER|KIE|APIMART|APICORE|FAL|AWS)_[A-Z0-9_]+\b|<NAME>_[A-Z_]+")


def test_the_readme_is_a_front_door() -> None:
    lines = README.read_text().splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines; details belong in docs/"
    text = "\n".join(lines)
    for command in ("scripts/serve", "scripts/test", "pip install .", "docker build"):
        assert command in text, command
    # Nothing is published: an install line naming the distribution would fail for a reader.
    assert not re.search(r"pip install\s+['\"]?flux-receiver", text)


def test_no_page_quotes_commits_or_issue_numbers() -> None:
    for page in PAGES:
        for number, line in enumerate(page.read_text().splitlines(), 1):
            found = COMMIT.search(line) or ISSUE.search(line)
            assert not found, f"{page.relative_to(ROOT)}:{number}: {found.group(0)!r} in {line!r}"


def test_nothing_points_outside_the_repository() -> None:
    for page in PAGES:
        assert "providers.md" not in page.read_text().replace("providers/index.md", ""), page


def read_by_config() -> set[str]:
    source = (ROOT / "receiver" / "config.py").read_text()
    names = set(re.findall(r'"((?:RECEIVER|KIE|APIMART|APICORE|FAL|AWS)_[A-Z0-9_]+)"', source))
    names |= {f"<NAME>{suffix}" for suffix in re.findall(r'f"\{prefix\}(_[A-Z_]+)"', source)}
    return names


def documented_in_operations() -> set[str]:
    """The names in the first column of the tables under Operations' `## Configuration`."""
    text = (ROOT / "docs" / "operations.md").read_text()
    section = text.split("\n## Configuration\n", 1)[1].split("\n## ", 1)[0]
    rows = [line.split(" | ")[0] for line in section.splitlines() if line.startswith("| `")]
    return {name for row in rows for name in VARIABLE.findall(row)}


def test_the_configuration_table_is_what_config_reads() -> None:
    read, documented = read_by_config(), documented_in_operations()
    assert len(read) > 40  # the scan found the settings at all
    assert read - documented == set(), "read by receiver/config.py, missing from docs/operations.md"
    assert documented - read == set(), "in docs/operations.md, not read by receiver/config.py"


def test_the_api_reference_renders_every_operation_and_schema() -> None:
    spec = importlib.util.spec_from_file_location("docs_hooks", ROOT / "scripts" / "docs_hooks.py")
    assert spec is not None and spec.loader is not None
    hooks: Any = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hooks)
    document = openapi_document("http://127.0.0.1:8000")
    page = hooks.on_page_markdown("# Reference\n\n<!-- generated: openapi -->\n")
    assert "<!-- generated" not in page
    for path, item in document["paths"].items():
        for method, operation in item.items():
            assert f"### {method.upper()} `{path}` {{ #{operation['operationId']} }}" in page
            for parameter in operation.get("parameters", []):
                assert f"| `{parameter['name']}` | {parameter['in']} |" in page, (path, parameter["name"])
    for name, schema in document["components"]["schemas"].items():
        assert f"### {name} {{ #schema-{name.lower()} }}" in page
        for field in schema.get("properties", {}):
            assert f"| `{field}` |" in page, (name, field)
