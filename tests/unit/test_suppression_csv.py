"""The suppression CSV reader refuses a whole file with a sentence naming the bad line:
not an address, an unknown reason, a source longer than its column, and what the csv
module cannot read at all (an unterminated quote running past its 128 KB field limit)."""

from __future__ import annotations

import pytest

from relay.store.db import Suppression
from relay.store.suppression import SOURCE_MAX, parse_csv


def test_rows_with_reason_source_and_detail_are_read():
    rows = parse_csv("address,reason,source,detail\nA@Example.org,bounce,crm,hard\n")
    assert rows == [{"address": "A@Example.org", "reason": "bounce", "source": "crm",
                     "detail": "hard"}]


@pytest.mark.parametrize("text, line", [
    ('address,reason\nok@example.org,manual\n"bad@example.org,manual\n' + "x" * 140_000,
     3),
    ('ok@example.org\nfine@example.org\n"' + "y" * 140_000 + "\n", 3),
    ('"' + "z" * 140_000, 1),
])
def test_an_unterminated_quote_over_the_field_limit_is_a_value_error_naming_its_line(
        text, line):
    with pytest.raises(ValueError, match=rf"^line {line}: cannot read the CSV: .*field"):
        parse_csv(text)


def test_a_source_longer_than_its_column_is_refused_not_cut():
    assert SOURCE_MAX == Suppression.__table__.c.source.type.length
    ok = "s" * SOURCE_MAX
    assert parse_csv(f"address,source\na@example.org,{ok}\n")[0]["source"] == ok
    with pytest.raises(ValueError, match=r"^line 3: source 'sss.*longer than 32 characters"):
        parse_csv(f"address,source\na@example.org,{ok}\nb@example.org,{ok}s\n")
