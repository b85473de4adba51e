"""The configuration reference (docs/configuration.md), generated from the config model.

Every field of `PipelineConfig` with its type, default and description; a nested section gets a heading of its
own. Written by `python -m tunepipe.tasks.runtime.config_reference`; a test fails when the committed page is stale.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import textwrap
import types
import typing
from pathlib import Path
from typing import Any, Literal

import annotated_types
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from tunepipe.tasks.runtime.config import PipelineConfig

PAGE = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"
COMMAND = "python -m tunepipe.tasks.runtime.config_reference"

INTRO = f"""\
# Configuration reference

One YAML file drives a tunepipe run. This page lists every key: its type, its default and what it does.
Unknown keys and wrong types fail when the config loads, naming the key's YAML path. Any key can be overridden
on the command line (`tunepipe run CONFIG --set train.max_steps=20`), and `tunepipe schema` prints the JSON
schema for editor completion (`configs/tunepipe.schema.json`).

Generated from the config model (`tunepipe.tasks.runtime.config.PipelineConfig`) by `{COMMAND}`:
do not edit by hand.
"""


def render() -> str:
    """The whole page, Markdown."""
    sections: list[str] = [INTRO]
    _section(PipelineConfig, "Top level", "", sections)
    return "\n".join(sections)


def _section(
    model: type[BaseModel],
    title: str,
    path: str,
    out: list[str],
    level: int = 2,
    seen: dict[type[BaseModel], str] | None = None,
) -> None:
    """One heading and table for `model`, then a heading for each nested section, in field order. A section
    model met before (the retrain plan's steps and `past_best`) points at its first table."""
    seen = {} if seen is None else seen
    out.append(f"{'#' * level} {title}\n")
    if model in seen:
        out.append(f"The same keys as `{seen[model]}`.\n")
        return
    seen[model] = path.rstrip(".")
    if model.__doc__ and model is not PipelineConfig and model.__doc__ != BaseModel.__doc__:
        out.append(textwrap.fill(" ".join(model.__doc__.split()), width=120) + "\n")
    rows = ["| key | type | default | description |", "|---|---|---|---|"]
    nested: list[tuple[type[BaseModel], str]] = []
    for name, field in model.model_fields.items():
        key = f"{path}{name}"
        inner = _nested_model(field.annotation)
        if inner is not None:
            model_type, suffix = inner
            nested.append((model_type, key + suffix))
        rows.append(
            f"| `{key}` | {_cell(_type(field.annotation))} | {_cell(_default(field))} | "
            f"{_cell(_description(field, inner))}{_long_default(field)} |"
        )
    out.append("\n".join(rows) + "\n")
    for model_type, key in nested:
        _section(model_type, f"`{key}`", key + ".", out, min(level + 1, 4) if path else level, seen)


def _nested_model(annotation: Any) -> tuple[type[BaseModel], str] | None:
    """The section model a field holds (directly, optionally, per list item or per mapping key) and how its
    keys are written under the field's own."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, ""
    if origin in (typing.Union, types.UnionType):
        found = [_nested_model(arg) for arg in args if arg is not type(None)]
        return found[0] if len(found) == 1 else None
    if origin is list and args and _nested_model(args[0]):
        return _nested_model(args[0])[0], "[]"
    if origin is dict and len(args) == 2 and _nested_model(args[1]):
        return _nested_model(args[1])[0], ".<metric>" if args[0] is str else ".<key>"
    return None


def _type(annotation: Any) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is type(None):
        return "null"
    if origin is Literal:
        return " \\| ".join(json.dumps(arg) for arg in args)
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(_type(arg) for arg in args)
    if origin is list:
        return f"list of {_type(args[0])}"
    if origin is dict:
        return f"mapping {_type(args[0])} → {_type(args[1])}"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "section"
    if annotation is Path:
        return "path"
    names = {str: "string", int: "integer", float: "number", bool: "boolean"}
    return names.get(annotation, getattr(annotation, "__name__", str(annotation)))


def _default(field: FieldInfo) -> str:
    if field.default is PydanticUndefined and field.default_factory is None:
        return "**required**"
    value = field.default_factory() if field.default_factory is not None else field.default
    if isinstance(value, BaseModel):
        dumped = {
            name: getattr(value, name)
            for name, spec in type(value).model_fields.items()
            if getattr(value, name) != spec.get_default(call_default_factory=True)
        }
        dumped = {name: str(item) if isinstance(item, Path) else item for name, item in dumped.items()}
        return "(section defaults)" if not dumped else f"`{json.dumps(dumped)}`"
    if isinstance(value, list) and value and isinstance(value[0], BaseModel):
        value = [item.model_dump(mode="json", exclude_defaults=True) for item in value]
    if isinstance(value, str) and "\n" in value:
        return "see description"
    return f"`{json.dumps(str(value) if isinstance(value, Path) else value, ensure_ascii=False)}`"


def _description(field: FieldInfo, inner: tuple[type[BaseModel], str] | None) -> str:
    text = " ".join((field.description or "").split())
    limits = _limits(field)
    if limits:
        text = f"{text} ({limits})" if text else limits
    if inner is not None and not text:
        text = "See its section below."
    return text


def _long_default(field: FieldInfo) -> str:
    """A default of several lines (the judge's rubric), line by line inside its table cell."""
    value = field.default
    if not (isinstance(value, str) and "\n" in value):
        return ""
    return "<br>Default:<br>" + "<br>".join(_cell(line) for line in value.splitlines())


def _limits(field: FieldInfo) -> str:
    """Bounds a value must keep, from the field's constraints."""
    words = {
        annotated_types.Gt: "> {}",
        annotated_types.Ge: "≥ {}",
        annotated_types.Lt: "< {}",
        annotated_types.Le: "≤ {}",
        annotated_types.MinLen: "at least {} item(s)",
    }
    return ", ".join(
        word.format(dataclasses.astuple(item)[0])
        for item in field.metadata
        for kind, word in words.items()
        if isinstance(item, kind)
    )


def _cell(text: str) -> str:
    # A pipe inside a table cell ends the cell unless escaped, a bare newline ends the row, and outside code
    # spans `<key>` would be read as an HTML tag.
    if "\\|" not in text:
        text = text.replace("|", "\\|")
    spans = text.replace("\n", " ").split("`")
    return "`".join(span if i % 2 else span.replace("<", "&lt;").replace(">", "&gt;") for i, span in enumerate(spans))


def main(argv: list[str] | None = None) -> int:
    """Write the page (or, with `--check`, exit 1 when the committed one is stale)."""
    args = sys.argv[1:] if argv is None else argv
    if "--check" in args:
        stale = not PAGE.exists() or PAGE.read_text() != render()
        if stale:
            print(f"{PAGE} is stale: run `{COMMAND}`", file=sys.stderr)
        return int(stale)
    PAGE.write_text(render())
    print(f"wrote {PAGE}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
