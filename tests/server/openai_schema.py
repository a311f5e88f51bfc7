"""Check a JSON body against OpenAI's published schema: validate(body, "CreateChatCompletionResponse").

The schemas are the components in openai-schemas.json (made by vendor_openai_schemas.py from OpenAI's openapi.json),
read once. The spec is OpenAPI 3.1, so they are checked as JSON Schema Draft 2020-12, with these readings:

- 3.0's `nullable: true`, which the spec still uses in a few places (the chat stream's finish_reason, logprobs and
  usage), also accepts null: such a schema becomes anyOf [itself, {"type": "null"}] when loaded.
- `discriminator` is ignored, as jsonschema does; the oneOf/anyOf beside it decide. They are only made faster (and
  their errors clearer): a branch that lists the strings a property may be (enum, const), where the object has
  another string there (a `type` or `role` of another branch), cannot match, so it is not tried. That skips only
  branches that would fail, so no verdict changes (test_openai_schema.py checks this against plain jsonschema),
  and when one branch is left, its errors are the ones reported.
- oneOf stays oneOf: the branches of every oneOf that our bodies reach differ in a required `type` or `role`, so a
  correct object matches one branch. The one overlap in these components is InputItem (reached only through an
  array `instructions` in a Response): {"type": "message", "role": "user", "content": [{"type": "input_text", ...}]}
  is both an EasyInputMessage and an InputMessage, so oneOf rejects it. CreateResponse takes `instructions` only as
  a string, so a server that echoes it never sends that array; test_openai_schema.py pins the overlap down.
- `format` is not asserted (jsonschema's default; the spec's formats include its own, such as "unixtime").
"""
import json
from functools import cache

from jsonschema import Draft202012Validator, ValidationError, validators
from jsonschema.exceptions import best_match

from tests.server.vendor_openai_schemas import OUT as FILE
from tests.server.vendor_openai_schemas import PREFIX, SCHEMA_LISTS, SCHEMA_MAPS, SCHEMA_ONE


def allow_null(schema):
    """`schema` with each 3.0-style `nullable: true`, at any depth, written as an anyOf with null."""
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key in SCHEMA_MAPS:
            value = {name: allow_null(sub) for name, sub in value.items()}
        elif key in SCHEMA_LISTS:
            value = [allow_null(sub) for sub in value]
        elif key in SCHEMA_ONE:
            value = allow_null(value)
        out[key] = value
    if out.pop("nullable", False):
        return {"anyOf": [out, {"type": "null"}]}
    return out


@cache
def schemas():
    """Every vendored component, name -> schema, after the `nullable` rewrite."""
    vendored = json.loads(FILE.read_text())["schemas"]
    return {name: allow_null(schema) for name, schema in vendored.items()}


def component(ref):
    return schemas()[ref.removeprefix(PREFIX)]


def strings(schema, seen):
    """Strings that include all that `schema` accepts when it lists them (enum, const, null), else None."""
    if not isinstance(schema, dict):
        return None
    if "$ref" in schema and schema["$ref"] not in seen:
        return strings(component(schema["$ref"]), seen | {schema["$ref"]})
    if "enum" in schema:
        return frozenset(value for value in schema["enum"] if isinstance(value, str))
    if "const" in schema:
        return frozenset([schema["const"]] if isinstance(schema["const"], str) else [])
    if schema.get("type") == "null":
        return frozenset()
    branches = schema.get("anyOf") or schema.get("oneOf")
    return union(strings(sub, seen) for sub in branches) if branches else None


def union(sets):
    sets = list(sets)
    return None if None in sets else frozenset().union(*sets)


def all_of(maps):
    """Listed strings that hold together: each property may be only what every map allows."""
    out = {}
    for listed in maps:
        for name, values in listed.items():
            out[name] = out[name] & values if name in out else values
    return out


def any_of(maps):
    """Listed strings of which one map holds: a property counts only where every map lists it."""
    maps = list(maps)
    names = set.intersection(*(set(listed) for listed in maps)) if maps else set()
    return {name: frozenset().union(*(listed[name] for listed in maps)) for name in names}


def listed_strings(schema, seen=frozenset()):
    """{property: the strings it may be} for the properties whose values `schema` lists, at the top of an object."""
    if not isinstance(schema, dict):
        return {}
    found = []
    if "$ref" in schema and schema["$ref"] not in seen:
        found.append(listed_strings(component(schema["$ref"]), seen | {schema["$ref"]}))
    properties = schema.get("properties", {}).items()
    found.append({name: values for name, sub in properties if (values := strings(sub, seen)) is not None})
    found.extend(listed_strings(sub, seen) for sub in schema.get("allOf", []))
    for keyword in ("anyOf", "oneOf"):
        if keyword in schema:
            found.append(any_of(listed_strings(sub, seen) for sub in schema[keyword]))
    return all_of(found)


BRANCH_STRINGS = {}  # id of an anyOf/oneOf list in schemas() (which lives for good) -> listed_strings of each branch


def branch_strings(branches):
    if id(branches) not in BRANCH_STRINGS:
        BRANCH_STRINGS[id(branches)] = [listed_strings(branch) for branch in branches]
    return BRANCH_STRINGS[id(branches)]


def could_match(listed, instance):
    """False when a string property of `instance` (an object) is none that `listed` allows for it."""
    return all(not isinstance(instance.get(name), str) or instance[name] in values for name, values in listed.items())


def pruned(keyword):
    """jsonschema's anyOf or oneOf, not trying the branches that an object's string properties already rule out
    (such as its `type` or `role`)."""
    plain = Draft202012Validator.VALIDATORS[keyword]

    def check(validator, branches, instance, schema):
        if not isinstance(instance, dict):
            yield from plain(validator, branches, instance, schema)
            return
        listed = branch_strings(branches)
        possible = [could_match(each, instance) for each in listed]
        if possible.count(True) == 1:  # the verdict is that branch's, and so are the errors
            index = possible.index(True)
            yield from validator.descend(instance, branches[index], schema_path=index)
        elif True not in possible:
            yield from explain(validator, keyword, branches, listed, instance, schema)
        else:  # `False` fails at once, as the skipped branch would have
            yield from plain(validator, [b if ok else False for b, ok in zip(branches, possible)], instance, schema)

    return check


def explain(validator, keyword, branches, listed, instance, schema):
    """Errors for an object that no branch can match: the errors of the branch its discriminator names, if one
    does (the verdict is failure either way; this only picks the clearest account of it)."""
    key = schema.get("discriminator", {}).get("propertyName", "type")
    kind = instance.get(key)
    named = [index for index, each in enumerate(listed) if isinstance(kind, str) and kind in each.get(key, ())]
    if len(named) == 1:
        yield from validator.descend(instance, branches[named[0]], schema_path=named[0])
        return
    names = sorted(set().union(*listed))
    shown = {name: instance[name] for name in names if isinstance(instance.get(name), str)}
    yield ValidationError(f"no {keyword} branch allows {shown}")


Validator = validators.extend(Draft202012Validator, {"anyOf": pruned("anyOf"), "oneOf": pruned("oneOf")})


@cache
def validator(name, plain=False):
    """A validator for component `name`, built once; its refs resolve against the whole vendored document.

    `plain` gives jsonschema's own, without the pruning (the tests compare the two)."""
    if name not in schemas():
        raise KeyError(f"no component {name!r} in {FILE.name}")
    # The components ride along in the root schema: `components` is not a keyword, so only the $ref validates.
    root = {"$ref": PREFIX + name, "components": {"schemas": schemas()}}
    return (Draft202012Validator if plain else Validator)(root)


def validate(instance, name):
    """Raise jsonschema.ValidationError, naming the JSON path, unless `instance` matches component `name`."""
    error = best_match(validator(name).iter_errors(instance))
    if error is not None:
        # Without the schema, str(error) is the message alone, not a dump of a large schema.
        raise ValidationError(f"{error.json_path}: {error.message}"[:2000], path=error.path, instance=error.instance,
                              schema_path=error.schema_path, validator=error.validator, context=error.context)
