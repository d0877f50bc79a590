"""Parser of the filter expression language: precedence, quoting, errors."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from silvertorch.index.expr import And, FilterSyntaxError, Not, Or, Term, parse, tokenize


def T(f: str, v: str) -> Term:
    return Term(f, v)


def test_precedence_not_and_or() -> None:
    assert parse("a:1 OR b:2 AND NOT c:3") == Or((T("a", "1"), And((T("b", "2"), Not(T("c", "3"))))))
    assert parse("NOT a:1 AND b:2") == And((Not(T("a", "1")), T("b", "2")))
    assert parse("(a:1 OR b:2) AND c:3") == And((Or((T("a", "1"), T("b", "2"))), T("c", "3")))
    assert parse("NOT NOT a:1") == Not(Not(T("a", "1")))


def test_symbols_and_case_insensitive_keywords() -> None:
    want = parse("a:1 AND (b:2 OR NOT c:3)")
    for text in ["a:1 & (b:2 | !c:3)", "a:1 && (b:2 || ! c:3)", "a:1 and (b:2 Or not c:3)"]:
        assert parse(text) == want


def test_values_quoting_and_special_characters() -> None:
    assert parse("genre:Children's") == T("genre", "Children's")
    assert parse('genre:"Children\'s"') == T("genre", "Children's")
    assert parse("genre:Film-Noir") == T("genre", "Film-Noir")
    assert parse("decade:1990s") == T("decade", "1990s")
    assert parse("price:9.99") == T("price", "9.99")
    assert parse('genre:"Sci Fi" AND x:\'a"b\'') == And((T("genre", "Sci Fi"), T("x", 'a"b')))
    assert parse(r'x:"a\"b\\c"') == T("x", 'a"b\\c')
    assert parse("and:or") == T("and", "or")  # a keyword followed by ':' is a feature name


def test_empty_is_match_all() -> None:
    assert parse(None) is None
    assert parse("") is None
    assert parse("   ") is None


@pytest.mark.parametrize(
    "text, position, token",
    [
        ("a:1 AND", 7, "<end>"),
        ("a:1 b:2", 4, "b:2"),
        ("(a:1 OR b:2", 11, "<end>"),
        ("a:1)", 3, ")"),
        ("a:", 2, "a:"),
        ("a:(x)", 2, "a:"),
        ("genre", 0, "genre"),
        ("a:1 AND OR b:2", 8, "OR"),
        ('a:"open', 2, '"open'),
        ("a:1 # b:2", 4, "#"),
        ("()", 1, ")"),
        ("NOT", 3, "<end>"),
    ],
)
def test_syntax_errors_name_position_and_token(text: str, position: int, token: str) -> None:
    with pytest.raises(FilterSyntaxError) as err:
        parse(text)
    assert err.value.position == position
    assert err.value.token == token
    assert f"position {position}" in str(err.value) and repr(token) in str(err.value)
    assert str(err.value).count("at position") == 1  # one position, the error's (was twice)


def test_unclosed_paren_names_the_opening_paren() -> None:
    with pytest.raises(FilterSyntaxError) as err:
        parse("a:1 AND (b:2 OR c:3")
    assert "'(' opened at character 8" in str(err.value) and err.value.position == 19


def test_tokenize_positions() -> None:
    toks = tokenize("a:1 AND !b:\"x y\"")
    assert [(t.kind, t.pos) for t in toks] == [("TERM", 0), ("AND", 4), ("NOT", 8), ("TERM", 9), ("END", 16)]
    assert toks[3].value == "x y"


_names = st.sampled_from(["genre", "tag", "creator_id", "a.b", "x-y"])
_values = st.text(alphabet=st.sampled_from(list("ab'-.: \"\\()&|!9")), min_size=1, max_size=6)


def _trees():
    leaf = st.builds(Term, _names, _values)
    return st.recursive(
        leaf,
        lambda kids: st.one_of(
            st.builds(Not, kids),
            st.builds(lambda xs: And(tuple(xs)), st.lists(kids, min_size=2, max_size=3)),
            st.builds(lambda xs: Or(tuple(xs)), st.lists(kids, min_size=2, max_size=3)),
        ),
        max_leaves=8,
    )


@settings(max_examples=200, deadline=None)
@given(_trees())
def test_render_parse_round_trip(tree) -> None:
    """str(ast) quotes what needs quoting and parenthesizes: parsing it gives the same tree
    (up to flattening of nested same-operator chains, which the renderer wraps in parentheses)."""
    assert parse(str(tree)) == tree
