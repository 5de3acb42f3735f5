"""The README and the documentation site keep their promises: short, about the product, and equal to the code.

(That every example in them runs is tests/test_readme.py; that every link and anchor resolves is the
strict `mkdocs build` in scripts/test.)
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Any

from receiver.config import VARIABLES
from receiver.openapi import openapi_document

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").rglob("*.md"))]
# A commit hash: 7 to 40 hex digits, with at least one letter and one digit (so no plain word or number).
COMMIT = re.compile(r"(?<![\w/.:-])(?=[0-9a-f]*[a-f])(?=[0-9a-f]*[0-9])[0-9a-f]{7,40}(?![\w/-])")
ISSUE = re.compile(r"\bissues?\s+#?\d+|(?<![\w&/#])#\d+\b|\bcommit\s+`?[0-9a-f]{7}", re.I)
# The service's variables, by their prefixes.
OURS = ("RECEIVER_", "KIE_", "APIMART_", "APICORE_", "FAL_", "AWS_", "SANDBOX_")
VARIABLE = re.compile(r"\b(?:RECEIVER|KIE|APIMART|APICORE|FAL|AWS|SANDBOX)_[A-Z0-9_]+\b")


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


def docs_hooks() -> Any:
    spec = importlib.util.spec_from_file_location("docs_hooks", ROOT / "scripts" / "docs_hooks.py")
    assert spec is not None and spec.loader is not None
    hooks: Any = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hooks)
    return hooks


def documented_in_operations() -> set[str]:
    """The names in the table rows under Operations' `## Configuration`, as the site renders it."""
    page = docs_hooks().on_page_markdown((ROOT / "docs" / "operations.md").read_text())
    section = page.split("\n## Configuration\n", 1)[1].split("\n## ", 1)[0]
    assert "<!-- settings" not in section, "a section marker names no section of the settings table"
    rows = [line for line in section.splitlines() if line.startswith("| ")]
    return {name for row in rows for name in VARIABLE.findall(row)}


def test_the_configuration_tables_are_the_settings_table() -> None:
    declared, documented = set(VARIABLES), documented_in_operations()
    assert len(declared) > 60  # the providers' variables and their pacing overrides are in
    assert declared - documented == set(), "declared in the settings table, missing from docs/operations.md"
    assert documented - declared == set(), (
        "in docs/operations.md's tables, not declared in the settings table"
    )


# Read by the command line and the Python client on the calling side, never by the service.
CLIENT_SIDE = {"RECEIVER_URL", "RECEIVER_API_KEY"}
# A variable of ours named in the package's code: a quoted name, or one looked up in a mapping.
NAMED = re.compile(r"""["'](?:RECEIVER|KIE|APIMART|APICORE|FAL|AWS|SANDBOX)_[A-Z0-9_]+["']""")
LOOKED_UP = re.compile(r"""(?:env|environ)(?:\.get\(|\[)\s*["']([A-Z][A-Z0-9_]*)["']""")


def test_no_undeclared_variable_is_read() -> None:
    """Every variable the package names or looks up is in the settings table (or is the client's)."""
    found: dict[str, str] = {}
    for path in sorted((ROOT / "receiver").rglob("*.py")):
        source = path.read_text()
        for name in [quoted[1:-1] for quoted in NAMED.findall(source)] + LOOKED_UP.findall(source):
            found.setdefault(name, str(path.relative_to(ROOT)))
    assert "RECEIVER_DATA_DIR" in found and "KIE_API_KEY" in found  # the scan sees the declarations
    ours = {name: path for name, path in found.items() if name.startswith(OURS)}
    undeclared = {
        name: path for name, path in ours.items() if name not in VARIABLES and name not in CLIENT_SIDE
    }
    assert undeclared == {}, "read or named in receiver/ without a declaration in the settings table"
    outside = {name: path for name, path in found.items() if not name.startswith(OURS)}
    assert set(outside) <= {"SSL_CERT_FILE", "PYTHONPATH"}, outside


def test_the_api_reference_renders_every_operation_and_schema() -> None:
    hooks = docs_hooks()
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
