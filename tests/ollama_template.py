"""Ollama's side of a Modelfile, for the tests: its parser's triple quotes, what it does to a chat
before the TEMPLATE sees it, and a Go text/template evaluator for exactly the subset that
stages/lib/export.py writes (text, trim markers, if / else if / else, range over a list with or
without `$i, $_ :=`, `$x := ...` and `$x = ...`, fields of `.` `$` and variables, string / int /
bool literals, eq and or not len slice index). Anything else raises GoTemplateError, so a test
cannot pass on a construct the evaluator skipped."""
from __future__ import annotations

import json
import re

WHITESPACE = " \t\r\n"  # what Go's {{- and -}} trim


class GoTemplateError(ValueError):
    """A construct outside the subset this evaluator knows."""


def _lex(src: str) -> list[tuple[str, str]]:
    items, pos, trim_next = [], 0, False
    while True:
        start = src.find("{{", pos)
        text = src[pos:] if start < 0 else src[pos:start]
        items.append(("text", text.lstrip(WHITESPACE) if trim_next else text))
        if start < 0:
            return items
        end = src.find("}}", start)
        if end < 0:
            raise GoTemplateError("unclosed action")
        body = src[start + 2:end]
        left, trim_next = re.match(r"-[ \t\r\n]", body) is not None, re.search(r"[ \t\r\n]-$", body) is not None
        if left:
            items[-1] = ("text", items[-1][1].rstrip(WHITESPACE))
        body = body[2 if left else 0:len(body) - 2 if trim_next else len(body)].strip()
        if not body or body.startswith("/*") or "|" in body:
            raise GoTemplateError(f"unsupported action {{{{{body}}}}}")
        items.append(("action", body))
        pos = end + 2


def _parse(items, i=0, nested=False):
    """Nodes up to an {{ end }} / {{ else ... }} (returned as the terminator) or the end."""
    nodes = []
    while i < len(items):
        kind, body = items[i]
        i += 1
        if kind == "text":
            nodes.append(("text", body))
        elif body == "end" or body == "else" or body.startswith("else if "):
            if not nested:
                raise GoTemplateError(f"unexpected {{{{ {body} }}}}")
            return nodes, i, body
        elif body.startswith("if "):
            branches, condition = [], body[3:]
            while True:
                block, i, term = _parse(items, i, True)
                branches.append((condition, block))
                if term == "end":
                    break
                if term == "else":
                    block, i, term = _parse(items, i, True)
                    if term != "end":
                        raise GoTemplateError("{{ else }} must be the last branch")
                    branches.append((None, block))
                    break
                condition = term[len("else if "):]
            nodes.append(("if", branches))
        elif body.startswith("range "):
            match = re.fullmatch(r"range\s+(?:(\$\w+)\s*,\s*(\$\w*)\s*:=\s*)?(.+)", body)
            block, i, term = _parse(items, i, True)
            if term != "end":
                raise GoTemplateError("{{ range }} with {{ else }} is not supported")
            nodes.append(("range", match.group(1), match.group(2), match.group(3), block))
        elif match := re.fullmatch(r"(\$\w+)\s*(:?=)\s*(.+)", body):
            nodes.append(("set", match.group(1), match.group(2), match.group(3)))
        else:
            nodes.append(("print", body))
    if nested:
        raise GoTemplateError("missing {{ end }}")
    return nodes, i, None


def _truthy(value) -> bool:
    if isinstance(value, (bool, int, str, list, dict)):
        return bool(value)
    if value is None:
        return False
    raise GoTemplateError(f"truth of {value!r}")


FUNCTIONS = {
    "eq": lambda a, *rest: any(a == b for b in rest),
    "and": lambda *args: next((a for a in args if not _truthy(a)), args[-1]),
    "or": lambda *args: next((a for a in args if _truthy(a)), args[-1]),
    "not": lambda a: not _truthy(a),
    "len": len,
    "slice": lambda x, start, *end: x[start:end[0]] if end else x[start:],
    "index": lambda x, i: x[i],
}


def _tokens(expression: str) -> list:
    """The expression as nested lists: ( ... ) is a sub-command."""
    stack = [[]]
    for token in re.findall(r'\(|\)|"(?:[^"\\]|\\.)*"|[^\s()]+', expression):
        if token == "(":
            stack.append([])
        elif token == ")":
            inner = stack.pop()
            stack[-1].append(inner)
        else:
            stack[-1].append(token)
    if len(stack) != 1:
        raise GoTemplateError(f"unbalanced parentheses in {expression!r}")
    return stack[0]


class _Scope:
    def __init__(self, root):
        self.root, self.frames = root, [{}]

    def lookup(self, name):
        for frame in reversed(self.frames):
            if name in frame:
                return frame
        raise GoTemplateError(f"undefined variable {name}")

    def command(self, tokens, dot):
        if not tokens:
            raise GoTemplateError("empty command")
        head = tokens[0]
        if isinstance(head, str) and head in FUNCTIONS:
            return FUNCTIONS[head](*(self.operand(t, dot) for t in tokens[1:]))
        if len(tokens) != 1:
            raise GoTemplateError(f"unknown function {head!r}")
        return self.operand(head, dot)

    def operand(self, token, dot):
        if isinstance(token, list):
            return self.command(token, dot)
        if token.startswith('"'):
            return json.loads(token)
        if token in ("true", "false"):
            return token == "true"
        if re.fullmatch(r"-?\d+", token):
            return int(token)
        if token.startswith("$"):
            name, *fields = token.split(".")
            value = self.root if name == "$" else self.lookup(name)[name]
        elif token.startswith("."):
            value, fields = dot, token[1:].split(".") if token != "." else []
        else:
            raise GoTemplateError(f"unknown identifier {token!r}")
        for field in fields:
            if not isinstance(value, dict) or field not in value:
                raise GoTemplateError(f"no field {field!r} in {token!r}")
            value = value[field]
        return value

    def run(self, nodes, dot, out):
        for node in nodes:
            kind = node[0]
            if kind == "text":
                out.append(node[1])
            elif kind == "print":
                value = self.command(_tokens(node[1]), dot)
                if not isinstance(value, str):
                    raise GoTemplateError(f"printing {value!r}")
                out.append(value)
            elif kind == "set":
                _, name, op, expression = node
                value = self.command(_tokens(expression), dot)
                (self.frames[-1] if op == ":=" else self.lookup(name))[name] = value
            elif kind == "if":
                for condition, block in node[1]:
                    if condition is None or _truthy(self.command(_tokens(condition), dot)):
                        self.frames.append({})
                        self.run(block, dot, out)
                        self.frames.pop()
                        break
            else:  # range
                _, index_name, element_name, expression, block = node
                items = self.command(_tokens(expression), dot)
                if not isinstance(items, list):
                    raise GoTemplateError(f"range over {items!r}")
                for index, item in enumerate(items):
                    frame = {index_name: index, element_name: item} if index_name else {}
                    self.frames.append(frame)
                    self.run(block, item, out)
                    self.frames.pop()


def render(template: str, data: dict) -> str:
    nodes, _, _ = _parse(_lex(template))
    out: list[str] = []
    _Scope(data).run(nodes, data, out)
    return "".join(out)


def ollama_prompt(template: str, messages: list[dict], system: str | None = None) -> str:
    """The prompt text Ollama's chat endpoint builds: the Modelfile's SYSTEM prompt in front of a
    chat that does not start with one, consecutive messages of one role merged (collate), every
    system prompt joined into .System, then the TEMPLATE (Ollama's server/routes.go and
    template/template.go)."""
    if system and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system}, *messages]
    collated: list[dict] = []
    for message in messages:
        if collated and collated[-1]["Role"] == message["role"] and message["role"] != "tool":
            collated[-1]["Content"] += "\n\n" + message["content"]
        else:
            collated.append({"Role": message["role"], "Content": message["content"]})
    joined = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    return render(template, {"System": joined, "Messages": collated})


def parse_modelfile(text: str) -> dict:
    """TEMPLATE, SYSTEM and the stop parameters of a Modelfile, as Ollama's parser reads them (a
    triple-quoted value runs to the first closing triple quote)."""
    found = {}
    for name in ("TEMPLATE", "SYSTEM"):
        match = re.search(rf'^{name} """(.*?)"""$', text, re.S | re.M)
        found[name.lower()] = match.group(1) if match else None
    found["stops"] = re.findall(r'^PARAMETER stop "(.*)"$', text, re.M)
    return found
