"""MkDocs hooks (mkdocs.yml `hooks:`): the parts of the site that are facts of the code, rendered from it.

A page holds a marker comment; at build time it is replaced by Markdown made from the package itself,
so the site cannot say one thing while the service does another:

- `<!-- generated: openapi -->`: every path, method, parameter, request body, answer and schema of the
  OpenAPI document the app serves at /openapi.json (`receiver.openapi.openapi_document`), and its
  webhooks.
- `<!-- generated: provider-fields -->`: which optional request fields each provider honours
  (each provider's own `fields`, what a 422 is decided by).
- `<!-- generated: prices -->`: the built-in price table (`receiver.prices.DEFAULT_PRICES`), each price
  with its source and the date it was taken.
- `<!-- settings: SECTION -->`: the configuration table of one section of the settings table
  (`receiver.config.SECTIONS`: each variable's name, help, range and default, as the service reads it).

Nothing is fetched: the document is built in-process, as the app builds it at start.
"""

from __future__ import annotations

import json
import re
from typing import Any

from receiver.config import SECTIONS
from receiver.models import OPTIONAL_FIELDS
from receiver.openapi import openapi_document
from receiver.prices import DEFAULT_PRICES
from receiver.prices import Price
from receiver.providers import REGISTRY
from receiver.variables import Variable

SERVER = "http://127.0.0.1:8000"
METHODS = ("get", "put", "post", "patch", "delete", "head", "options")
REF = "#/components/schemas/"


def on_page_markdown(markdown: str, **_: Any) -> str:
    if "<!-- generated: openapi -->" in markdown:
        markdown = markdown.replace("<!-- generated: openapi -->", openapi_markdown(openapi_document(SERVER)))
    if "<!-- generated: provider-fields -->" in markdown:
        markdown = markdown.replace("<!-- generated: provider-fields -->", provider_fields_markdown())
    if "<!-- generated: prices -->" in markdown:
        markdown = markdown.replace("<!-- generated: prices -->", prices_markdown())
    return SETTINGS_MARKER.sub(lambda found: settings_markdown(found.group(1)), markdown)


def prices_markdown() -> str:
    """The built-in prices, one row per provider and model, with where and when each was read."""
    lines = ["| provider | model | price (USD) | source | taken | verified |", "|---|---|---|---|---|---|"]
    for provider, models in DEFAULT_PRICES.items():
        for model, price in models.items():
            verified = "yes" if price.verified else "**no**: a secondary source"
            lines.append(
                f"| `{provider}` | `{model}` | {_price_text(price)} | {_cell(price.source)} | {price.taken}"
                f" | {verified} |"
            )
    return "\n".join(lines)


def _price_text(price: Price) -> str:
    if price.per_image is not None:
        return f"{price.per_image:g} per image"
    if price.per_resolution:
        return ", ".join(f"{value:g} at {name}" for name, value in price.per_resolution.items())
    first = "" if price.first_megapixel is None else f"{price.first_megapixel:g} the first megapixel, then "
    return f"{first}{price.per_megapixel:g} per megapixel"


SETTINGS_MARKER = re.compile(r"<!-- settings: ([a-z]+) -->")


def settings_markdown(section: str) -> str:
    """One section of the settings table; the providers' pacing overrides as one row per provider."""
    variables = SECTIONS[section]
    if section == "pacing":
        return pacing_markdown(variables)
    lines = ["| variable | meaning | default |", "|---|---|---|"]
    for var in variables:
        applies = f" ({', '.join(var.backends)} only)" if var.backends else ""
        lines.append(f"| `{var.name}` | {_cell(var.meaning())}{applies} | {var.default_cell()} |")
    return "\n".join(lines)


def pacing_markdown(variables: tuple[Variable, ...]) -> str:
    concurrent, per_minute = variables[:2]
    lines = [
        f"| provider | tasks accepted and unfinished at once ({concurrent.parse.span()}) | default "
        f"| new tasks sent per minute ({per_minute.parse.span()}) | default |",
        "|---|---|---|---|---|",
    ]
    for name, (at_once, rate) in zip(
        REGISTRY, zip(variables[::2], variables[1::2], strict=True), strict=True
    ):
        lines.append(
            f"| [{name}](providers/{name}.md) | `{at_once.name}` | {at_once.default_cell()} "
            f"| `{rate.name}` | {rate.default_cell()} |"
        )
    return "\n".join(lines)


def provider_fields_markdown() -> str:
    names = list(REGISTRY)
    lines = [
        "| field | " + " | ".join(f"[`{name}`]({name}.md)" for name in names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for field in OPTIONAL_FIELDS:
        marks = ("✓" if field in REGISTRY[name].fields else "—" for name in names)
        lines.append(f"| `{field}` | " + " | ".join(marks) + " |")
    return "\n".join(lines)


def openapi_markdown(document: dict[str, Any]) -> str:
    schemas: dict[str, Any] = document.get("components", {}).get("schemas", {})
    version = document["openapi"]
    out = [f"Generated from the OpenAPI {version} document the service serves at `/openapi.json`.", ""]
    for path, item in document["paths"].items():
        for method in METHODS:
            if method in item:
                out.extend(_operation(method, path, item[method]))
    if document.get("webhooks"):
        out += ["## Webhooks", ""]
        for name, item in document["webhooks"].items():
            for method in METHODS:
                if method in item:
                    out.extend(_operation(method, f"your notify_url ({name})", item[method]))
    out += ["## Schemas", ""]
    for name, schema in schemas.items():
        out.extend(_schema(name, schema))
    return "\n".join(out)


def _operation(method: str, path: str, operation: dict[str, Any]) -> list[str]:
    anchor = operation.get("operationId", "")
    title = f"### {method.upper()} `{path}`"
    out = [f"{title} {{ #{anchor} }}" if anchor else title, ""]
    if operation.get("summary"):
        out += [_text(operation["summary"]).rstrip(".") + ".", ""]
    if operation.get("description"):
        out += [_text(operation["description"]), ""]
    meta = [f"Operation `{anchor}`" if anchor else "", _security(operation)]
    out += ["; ".join(part for part in meta if part) + ".", ""]
    if operation.get("parameters"):
        out += ["| parameter | in | required | type | description |", "|---|---|---|---|---|"]
        for parameter in operation["parameters"]:
            schema = parameter.get("schema", {})
            required = "yes" if parameter.get("required") else "no"
            description = _cell(parameter.get("description") or schema.get("description", ""))
            name, where = parameter["name"], parameter["in"]
            out.append(f"| `{name}` | {where} | {required} | {_type(schema)} | {description} |")
        out.append("")
    body = operation.get("requestBody")
    if body:
        required = " (required)" if body.get("required") else ""
        out += [f"Request body{required}: {_content(body['content'])}.", ""]
        for content in body["content"].values():
            if "example" in content:
                out += ["Example:", "", "```json", json.dumps(content["example"], indent=2), "```", ""]
    out += ["| answer | description | body |", "|---|---|---|"]
    for status, answer in operation.get("responses", {}).items():
        kinds = _content(answer.get("content", {}))
        out.append(f"| {status} | {_cell(answer.get('description', ''))} | {kinds} |")
    out.append("")
    return out


def _content(content: dict[str, Any]) -> str:
    return ", ".join(f"`{kind}` {_type(media.get('schema', {}))}" for kind, media in content.items())


def _security(operation: dict[str, Any]) -> str:
    if "security" not in operation:
        return "needs `Authorization: Bearer <key>`"
    options = operation["security"]
    if not options:
        return "no key"
    if {} in options:
        return "a bearer key, or a signed link"
    return "needs `Authorization: Bearer <key>`"


def _schema(name: str, schema: dict[str, Any]) -> list[str]:
    out = [f"### {name} {{ #schema-{name.lower()} }}", ""]
    if schema.get("description"):
        out += [_text(schema["description"]), ""]
    properties: dict[str, Any] = schema.get("properties", {})
    if not properties:
        out += [f"Type: {_type(schema)}.", ""]
        return out
    required = set(schema.get("required", []))
    out += ["| field | type | required | description |", "|---|---|---|---|"]
    for field, spec in properties.items():
        out.append(
            f"| `{field}` | {_type(spec)} | {'yes' if field in required else 'no'} "
            f"| {_cell(spec.get('description', ''))} |"
        )
    out.append("")
    return out


def _type(spec: dict[str, Any]) -> str:
    """A schema in a few words: links to named schemas, `|` between alternatives, limits after."""
    if "$ref" in spec:
        name = spec["$ref"].removeprefix(REF)
        return f"[{name}](#schema-{name.lower()})"
    for key in ("anyOf", "oneOf"):
        if key in spec:
            return " or ".join(_type(choice) for choice in spec[key])
    if "const" in spec:
        return f"`{json.dumps(spec['const'])}`"
    if "enum" in spec:
        return "one of " + ", ".join(f"`{json.dumps(value)}`" for value in spec["enum"])
    kind = spec.get("type", "any")
    if isinstance(kind, list):
        kind = " or ".join(kind)
    if kind == "array":
        text = f"array of {_type(spec.get('items', {}))}"
    elif kind == "object" and isinstance(spec.get("additionalProperties"), dict):
        text = f"object of {_type(spec['additionalProperties'])}"
    else:
        text = kind
        if spec.get("format"):
            text += f" ({spec['format']})"
    limits = [
        f"{word} {spec[key]}"
        for key, word in (
            ("minLength", "min length"),
            ("maxLength", "max length"),
            ("minimum", "≥"),
            ("maximum", "≤"),
            ("minItems", "min items"),
            ("maxItems", "max items"),
        )
        if key in spec
    ]
    return text + (f" ({', '.join(limits)})" if limits else "")


def _text(text: str) -> str:
    """Prose from the document, with `<` and `>` outside code spans shown, not taken as HTML."""
    parts = text.strip().split("`")
    shown = (
        part if odd % 2 else part.replace("<", "&lt;").replace(">", "&gt;") for odd, part in enumerate(parts)
    )
    return "`".join(shown)


def _cell(text: str) -> str:
    return re.sub(r"\s+", " ", _text(text)).replace("|", "\\|") if text else ""
