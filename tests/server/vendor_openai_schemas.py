"""Vendor the part of OpenAI's OpenAPI spec that kvserve's responses must match: tests/server/openai-schemas.json.

    python tests/server/vendor_openai_schemas.py path/to/openapi.json

Keeps the components reachable from ROOTS and from the 200 responses of PATHS, with every `$ref` they reach,
and strips the keywords that only document (descriptions, examples, `x-` extensions) so the file stays small.
Everything that validates (`type`, `enum`, `required`, `nullable`, `discriminator`, ...) is kept as published.
tests/server/openai_schema.py loads the result.
"""
import json
import sys
from pathlib import Path

# Error is what the spec's 404 for DELETE /responses/{response_id} names; that path's 200 has no body in the spec,
# so there is no delete-response schema to vendor.
ROOTS = ["CreateCompletionResponse", "CreateChatCompletionResponse", "CreateChatCompletionStreamResponse",
         "ListModelsResponse", "Model", "DeleteModelResponse", "ErrorResponse", "Error",
         "Response", "ResponseStreamEvent", "ResponseItemList"]
PATHS = ["/responses", "/responses/{response_id}", "/responses/{response_id}/input_items", "/models",
         "/models/{model}", "/chat/completions", "/completions"]
OUT = Path(__file__).with_name("openai-schemas.json")
PREFIX = "#/components/schemas/"

# Where a schema holds other schemas; every other keyword's value is data (enum, const, default, required, ...)
# and is copied untouched, so a property or an enum value named "description" is never stripped.
SCHEMA_MAPS = {"properties", "patternProperties", "$defs", "definitions", "dependentSchemas"}
SCHEMA_LISTS = {"anyOf", "oneOf", "allOf", "prefixItems"}
SCHEMA_ONE = {"items", "additionalProperties", "not", "contains", "propertyNames", "if", "then", "else",
              "unevaluatedProperties", "unevaluatedItems", "additionalItems"}
DOC_ONLY = {"description", "title", "example", "examples", "deprecated", "$comment", "dataDescription"}


def slim(schema, name):
    """`schema` without its documentation-only keywords, at every depth; `name` is the component it sits in."""
    if not isinstance(schema, dict):
        return schema  # a boolean schema
    out = {}
    for key, value in schema.items():
        if key in DOC_ONLY or key.startswith("x-") or key == "$recursiveAnchor":
            continue
        if key == "$recursiveRef":
            # Draft 2019-09's self-reference (CompoundFilter's nested filters); 2020-12 ignores it, which would
            # accept anything there, so it becomes the plain $ref it stands for.
            assert value == "#", value
            key, value = "$ref", PREFIX + name
        if key in SCHEMA_MAPS:
            value = {prop: slim(sub, name) for prop, sub in value.items()}
        elif key in SCHEMA_LISTS:
            value = [slim(sub, name) for sub in value]
        elif key in SCHEMA_ONE:
            value = slim(value, name)
        out[key] = value
    return out


def refs(node):
    """The component names that `node` refers to, at any depth."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                assert value.startswith(PREFIX), value
                yield value[len(PREFIX):]
            else:
                yield from refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from refs(value)


def path_roots(spec):
    """The components named by the 200 responses (any content type) of PATHS."""
    for path in PATHS:
        for operation in spec["paths"][path].values():
            ok = operation.get("responses", {}).get("200", {}) if isinstance(operation, dict) else {}
            for content in ok.get("content", {}).values():
                yield from refs(content.get("schema", {}))


def closure(components, roots):
    """`roots` and every component they reach through $ref."""
    seen, todo = set(), list(roots)
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(refs(components[name]))
    return seen


def vendor(spec_path):
    spec = json.loads(Path(spec_path).read_text())
    components = spec["components"]["schemas"]
    names = closure(components, ROOTS + list(path_roots(spec)))
    licence = spec["info"]["license"]["name"]
    source = (f"OpenAI's OpenAPI spec (github.com/openai/openai-openapi, {licence} licence), openapi.json "
              f"version {spec['info']['version']}: the components that tests/server/vendor_openai_schemas.py "
              "keeps, without their documentation")
    schemas = {name: slim(components[name], name) for name in sorted(names)}
    OUT.write_text(json.dumps({"source": source, "schemas": schemas}, indent=1, sort_keys=True) + "\n")
    print(f"{len(schemas)} schemas -> {OUT} ({OUT.stat().st_size // 1024} KiB)")


if __name__ == "__main__":
    vendor(sys.argv[1])
