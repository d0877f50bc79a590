"""The filter expression language: tokenizer, recursive-descent parser, AST.

Grammar (keywords case-insensitive; NOT binds tighter than AND, AND tighter than OR)::

    expr    := or
    or      := and (("OR" | "|" | "||") and)*
    and     := unary (("AND" | "&" | "&&") unary)*
    unary   := ("NOT" | "!") unary | primary
    primary := term | "(" expr ")"
    term    := feature ":" value

``feature`` is a run of letters, digits and ``_ - . /``. ``value`` is either quoted — ``"..."`` or
``'...'``, with backslash escaping the quote or a backslash — or bare: a run of any characters
other than whitespace, parentheses, ``&``, ``|`` and double quotes. So ``genre:Children's``,
``genre:Film-Noir``, ``decade:1990s``, ``price:9.99`` and ``genre:"Sci Fi"`` are all one term. A
value that is a decimal number is also accepted as a value id when the vocabulary has no such name
(resolution happens in :mod:`silvertorch.index.plan`, not here). AND must be written: two terms side
by side are a syntax error, so a forgotten operator or an unquoted space never silently changes
the meaning.

An empty or all-blank expression parses to ``None`` ("match everything"). Errors raise
:class:`FilterSyntaxError` with the 0-based character ``position`` and the offending ``token``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Union

__all__ = ["FilterSyntaxError", "Token", "Term", "Not", "And", "Or", "Node", "tokenize", "parse"]


class FilterSyntaxError(ValueError):
    """An unparsable filter expression. ``position`` is a 0-based character offset."""

    def __init__(self, message: str, expression: str, position: int, token: str) -> None:
        self.expression = expression
        self.position = position
        self.token = token
        caret = " " * position + "^"
        super().__init__(
            f"{message} at position {position} (token {token!r})\n  {expression}\n  {caret}"
        )


@dataclass(frozen=True)
class Token:
    kind: str  # "TERM" | "AND" | "OR" | "NOT" | "(" | ")" | "END"
    text: str  # the source text of the token
    pos: int
    feature: str = ""
    value: str = ""


@dataclass(frozen=True)
class Term:
    feature: str
    value: str
    pos: int = field(default=0, compare=False)  # character offset in the source (for warnings)

    def __str__(self) -> str:
        return f"{self.feature}:{_quote(self.value)}"


@dataclass(frozen=True)
class Not:
    child: Node

    def __str__(self) -> str:
        return f"NOT {_wrap(self.child)}"


@dataclass(frozen=True)
class And:
    children: tuple[Node, ...]

    def __str__(self) -> str:
        return " AND ".join(_wrap(c) for c in self.children)


@dataclass(frozen=True)
class Or:
    children: tuple[Node, ...]

    def __str__(self) -> str:
        return " OR ".join(_wrap(c) for c in self.children)


Node = Union[Term, Not, And, Or]

_FEATURE_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-./")
_BARE_STOP = set(" \t\r\n\f\v()&|\"")
_KEYWORDS = {"and": "AND", "or": "OR", "not": "NOT"}


def _quote(value: str) -> str:
    if value and value[0] != "'" and not any(c in _BARE_STOP for c in value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _wrap(node: Node) -> str:
    return f"({node})" if isinstance(node, (And, Or)) else str(node)


def _read_quoted(text: str, i: int) -> tuple[str, int]:
    """Read a quoted value starting at the quote ``text[i]``; returns (value, index after it)."""
    quote, j, out = text[i], i + 1, []
    while j < len(text):
        c = text[j]
        if c == "\\" and j + 1 < len(text) and text[j + 1] in (quote, "\\"):
            out.append(text[j + 1])
            j += 2
        elif c == quote:
            return "".join(out), j + 1
        else:
            out.append(c)
            j += 1
    raise FilterSyntaxError("unterminated quoted value", text, i, text[i:])


def tokenize(text: str) -> list[Token]:
    """Split ``text`` into tokens (the last one is ``END``)."""
    tokens: list[Token] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c.isspace():
            i += 1
        elif c in "()!":
            tokens.append(Token({"!": "NOT"}.get(c, c), c, i))
            i += 1
        elif c in "&|":
            width = 2 if text.startswith(c * 2, i) else 1
            tokens.append(Token("AND" if c == "&" else "OR", text[i : i + width], i))
            i += width
        elif c in _FEATURE_CHARS:
            j = i
            while j < n and text[j] in _FEATURE_CHARS:
                j += 1
            word = text[i:j]
            if j < n and text[j] == ":":
                k = j + 1
                if k < n and text[k] in "\"'":
                    value, end = _read_quoted(text, k)
                else:
                    end = k
                    while end < n and text[end] not in _BARE_STOP:
                        end += 1
                    value = text[k:end]
                    if not value:
                        tok = text[i:k]
                        raise FilterSyntaxError("missing value after ':'", text, k, tok)
                tokens.append(Token("TERM", text[i:end], i, word, value))
                i = end
            elif word.lower() in _KEYWORDS:
                tokens.append(Token(_KEYWORDS[word.lower()], word, i))
                i = j
            else:
                raise FilterSyntaxError(
                    "expected 'feature:value', AND, OR, NOT or parentheses", text, i, word
                )
        else:
            j = i
            while j < n and not text[j].isspace() and text[j] not in "()":
                j += 1
            raise FilterSyntaxError("unexpected character", text, i, text[i:j] or c)
    tokens.append(Token("END", "", n))
    return tokens


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens = tokenize(text)
        self.i = 0

    def peek(self) -> Token:
        return self.tokens[self.i]

    def take(self) -> Token:
        tok = self.tokens[self.i]
        self.i += 1
        return tok

    def fail(self, message: str) -> FilterSyntaxError:
        tok = self.peek()
        return FilterSyntaxError(message, self.text, tok.pos, tok.text or "<end>")

    def parse_or(self) -> Node:
        parts = [self.parse_and()]
        while self.peek().kind == "OR":
            self.take()
            parts.append(self.parse_and())
        return parts[0] if len(parts) == 1 else Or(tuple(parts))

    def parse_and(self) -> Node:
        parts = [self.parse_unary()]
        while self.peek().kind == "AND":
            self.take()
            parts.append(self.parse_unary())
        return parts[0] if len(parts) == 1 else And(tuple(parts))

    def parse_unary(self) -> Node:
        if self.peek().kind == "NOT":
            self.take()
            return Not(self.parse_unary())
        return self.parse_primary()

    def parse_primary(self) -> Node:
        tok = self.peek()
        if tok.kind == "TERM":
            self.take()
            return Term(tok.feature, tok.value, tok.pos)
        if tok.kind == "(":
            self.take()
            node = self.parse_or()
            if self.peek().kind != ")":
                raise self.fail(f"expected ')' to close the '(' opened at character {tok.pos}")
            self.take()
            return node
        raise self.fail("expected a term 'feature:value', NOT or '('")

    def parse(self) -> Node | None:
        if self.peek().kind == "END":
            return None
        node = self.parse_or()
        if self.peek().kind != "END":
            raise self.fail("expected AND, OR or the end of the expression")
        return node


@lru_cache(maxsize=4096)
def parse(text: str | None) -> Node | None:
    """Parse an expression into an AST (``None`` for ``None`` / blank = match everything).

    Raises :class:`FilterSyntaxError` naming the position and token of the first error.
    ``str(ast)`` renders an equivalent, fully parenthesized expression that parses back to it.
    """
    if text is None:
        return None
    return _Parser(text).parse()
