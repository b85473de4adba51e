"""Ollama's prompt rendering, for tests: Go's text/template semantics for the subset tunepipe's templates use,
and Ollama's way of filling it (server/prompt.go, template/template.go).

Ollama prepends the Modelfile's SYSTEM as a system message when a request brings none, passes every system
message's text joined as `.System`, and leaves the messages (consecutive same-role ones merged) in `.Messages`.
Supported: text with `{{- … -}}` trimming; `if`/`else if`/`else`/`end`; `range $i, $x := …` and `range …`;
`$x := …` and `$x = …`; pipelines of fields (`.Role`, `$.Messages`), variables, string and number literals,
parenthesised commands, and the builtins eq, ne, and, or, not, len, slice, index. Anything else raises.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

ACTION = re.compile(r"\{\{(-\s)?(.*?)(\s-)?\}\}", re.S)
TOKEN = re.compile(r'\s*(?:(?P<str>"(?:[^"\\]|\\.)*")|(?P<num>-?\d+)|(?P<op>:=|=|,|\(|\))|(?P<word>[$.]?[\w$.]*))')


def ollama_prompt(template: str, system: str | None, messages: list[dict[str, str]]) -> str:
    """The text Ollama's /api/chat feeds the model: what `template` renders for `messages` under SYSTEM `system`."""
    if system and (not messages or messages[0]["role"] != "system"):
        messages = [{"role": "system", "content": system}, *messages]
    systems = [m["content"] for m in messages if m["role"] == "system"]
    collated: list[dict[str, str]] = []
    for m in messages:
        if collated and collated[-1]["Role"] == m["role"]:
            collated[-1]["Content"] += "\n\n" + m["content"]
        else:
            collated.append({"Role": m["role"], "Content": m["content"]})
    return render(template, {"System": "\n\n".join(systems), "Messages": collated, "Tools": [], "Response": ""})


def render(template: str, data: dict[str, Any]) -> str:
    nodes, rest = _parse(_lex(template), ())
    if rest:
        raise ValueError(f"unexpected {{{{ {rest[0][1]} }}}}")
    out: list[str] = []
    _run(nodes, _Scope(data, [{"$": data}]), out)
    return "".join(out)


def _lex(template: str) -> list[tuple[str, str]]:
    """[("text", …) | ("action", …)] with Go's trim markers applied to the neighbouring text."""
    items: list[tuple[str, str]] = []
    pos, trim_next = 0, False
    for match in ACTION.finditer(template):
        text = template[pos:match.start()]
        if trim_next:
            text = text.lstrip()
        if match.group(1):
            text = text.rstrip()
        items += [("text", text), ("action", match.group(2).strip())]
        pos, trim_next = match.end(), bool(match.group(3))
    text = template[pos:]
    items.append(("text", text.lstrip() if trim_next else text))
    return items


@dataclass
class _Node:
    kind: str  # text, print, set, declare, if, range
    arg: Any = None
    body: list = field(default_factory=list)
    orelse: list = field(default_factory=list)


def _parse(items, stop: tuple[str, ...]):
    nodes: list[_Node] = []
    while items:
        kind, value = items[0]
        if kind == "text":
            nodes.append(_Node("text", value))
            items = items[1:]
            continue
        keyword = value.split(None, 1)[0] if value else ""
        if keyword in stop or (keyword == "else" and "else" in stop):
            return nodes, items
        items = items[1:]
        if keyword == "if":
            node, items = _parse_if(value[2:].strip(), items)
            nodes.append(node)
        elif keyword == "range":
            spec = value[5:].strip()
            variables, _, pipeline = spec.rpartition(":=")
            body, items = _parse(items, ("end", "else"))
            items = _expect_end(items)
            nodes.append(_Node("range", ([v.strip() for v in variables.split(",") if v.strip()],
                                         _tokens(pipeline.strip())), body))
        elif m := re.fullmatch(r"(\$\w*)\s*(:=|=)\s*(.*)", value, re.S):
            nodes.append(_Node("declare" if m[2] == ":=" else "set", (m[1], _tokens(m[3]))))
        else:
            nodes.append(_Node("print", _tokens(value)))
    if stop:
        raise ValueError("missing {{ end }}")
    return nodes, items


def _parse_if(condition: str, items):
    body, items = _parse(items, ("end", "else"))
    node = _Node("if", _tokens(condition), body)
    _, action = items[0]
    if action == "else":
        node.orelse, items = _parse(items[1:], ("end",))
        return node, _expect_end(items)
    if action.startswith("else if"):
        nested, items = _parse_if(action[len("else if"):].strip(), items[1:])
        node.orelse = [nested]
        return node, items
    return node, _expect_end(items)


def _expect_end(items):
    if not items or items[0] != ("action", "end"):
        raise ValueError("missing {{ end }}")
    return items[1:]


def _tokens(expr: str) -> list[tuple[str, str]]:
    tokens, pos = [], 0
    while pos < len(expr.rstrip()):
        m = TOKEN.match(expr, pos)
        kind = m.lastgroup
        if not m.group(kind):
            raise ValueError(f"cannot read {expr[pos:]!r}")
        tokens.append((kind, m.group(kind)))
        pos = m.end()
    return tokens


class _Scope:
    def __init__(self, dot: Any, frames: list[dict[str, Any]]):
        self.dot, self.frames = dot, frames

    def lookup(self, name: str) -> Any:
        for frame in reversed(self.frames):
            if name in frame:
                return frame[name]
        raise ValueError(f"undefined variable {name}")

    def assign(self, name: str, value: Any) -> None:
        for frame in reversed(self.frames):
            if name in frame:
                frame[name] = value
                return
        raise ValueError(f"undefined variable {name}")


def _run(nodes: list[_Node], scope: _Scope, out: list[str]) -> None:
    for node in nodes:
        if node.kind == "text":
            out.append(node.arg)
        elif node.kind == "print":
            out.append(_text(_eval(node.arg, scope)))
        elif node.kind == "declare":
            scope.frames[-1][node.arg[0]] = _eval(node.arg[1], scope)
        elif node.kind == "set":
            scope.assign(node.arg[0], _eval(node.arg[1], scope))
        elif node.kind == "if":
            branch = node.body if _truth(_eval(node.arg, scope)) else node.orelse
            _run(branch, _Scope(scope.dot, [*scope.frames, {}]), out)
        elif node.kind == "range":
            variables, pipeline = node.arg
            items = _eval(pipeline, scope)
            for i, item in enumerate(items):
                frame = dict(zip(variables, (i, item) if len(variables) == 2 else (item,)))
                _run(node.body, _Scope(item, [*scope.frames, frame]), out)


FUNCS = {
    "eq": lambda a, *bs: any(a == b for b in bs),
    "ne": lambda a, b: a != b,
    "not": lambda a: not _truth(a),
    "len": len,
    "slice": lambda seq, start=0, end=None: seq[start:end],
    "index": lambda seq, *keys: _index(seq, keys),
}


def _index(seq, keys):
    for key in keys:
        seq = seq[key]
    return seq


def _eval(tokens: list[tuple[str, str]], scope: _Scope) -> Any:
    args, rest = _operands(tokens, scope)
    if rest:
        raise ValueError(f"unexpected {rest}")
    if callable(args[0]):
        return args[0](*args[1:])
    if len(args) != 1:
        raise ValueError(f"{tokens}: can't give arguments to a non-function")
    return args[0]


def _operands(tokens, scope):
    """Evaluate operands up to a closing parenthesis; `and`/`or` are resolved here (short-circuit aside)."""
    values: list[Any] = []
    while tokens:
        kind, value = tokens[0]
        tokens = tokens[1:]
        if value == ")":
            return values, tokens
        if value == "(":
            inner, tokens = _operands(tokens, scope)
            values.append(inner[0](*inner[1:]) if callable(inner[0]) else inner[0])
        elif kind == "str":
            values.append(bytes(value[1:-1], "utf-8").decode("unicode_escape"))
        elif kind == "num":
            values.append(int(value))
        elif value in ("and", "or"):
            values.append(_and if value == "and" else _or)
        elif value in FUNCS:
            values.append(FUNCS[value])
        elif value in ("true", "false"):
            values.append(value == "true")
        else:
            values.append(_resolve(value, scope))
    return values, tokens


def _and(*args):
    for arg in args:
        if not _truth(arg):
            return arg
    return args[-1]


def _or(*args):
    for arg in args:
        if _truth(arg):
            return arg
    return args[-1]


def _resolve(word: str, scope: _Scope) -> Any:
    if word == ".":
        return scope.dot
    if word.startswith("$"):
        name, _, path = word.partition(".")
        value = scope.lookup(name)
    elif word.startswith("."):
        value, path = scope.dot, word[1:]
    else:
        raise ValueError(f"unknown function {word!r}")
    for part in filter(None, path.split(".")):
        value = value[part]  # a missing field is an error in Go for structs, as here
    return value


def _truth(value: Any) -> bool:
    if isinstance(value, (dict, list, tuple, str)):
        return len(value) > 0
    return bool(value)


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return "" if value is None else str(value)
