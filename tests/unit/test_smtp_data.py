"""relay.smtp_data reads DATA exactly as aiosmtpd's line-at-a-time loop does.

The reference below is aiosmtpd 1.4.6's DATA loop (smtp.py, smtp_DATA), reduced to what
decides the outcome: lines split on CRLF by a StreamReader with aiosmtpd's limit, a lone
dot ends the data, the size and line limits, dot-unstuffing. Both read the same bytes,
fed in random pieces (so CRLFs and terminators straddle reads), with a pipelined command
after the dot that must stay unread. Inputs mix the smuggling shapes (bare LF, bare CR,
dots in every position), long lines and oversized bodies. Fixed seed, bounded count.
"""

from __future__ import annotations

import asyncio
import random

import pytest

from relay.ingress.data import DATA_LIMIT, NOMINAL, TOO_LONG, TOO_MUCH, read_data

LIMIT = 1001  # aiosmtpd's line_length_limit and StreamReader limit
NEXT = b"QUIT\r\n"


async def reference(reader: asyncio.StreamReader, size_limit: int) -> tuple[bytes, str]:
    data: list[bytearray] = []
    num_bytes = 0
    fragments: list[bytes] = []
    state = NOMINAL
    while True:
        try:
            line = await reader.readuntil(b"\r\n")
        except asyncio.LimitOverrunError as e:
            if state == NOMINAL:
                state = TOO_LONG
            data *= 0
            line = await reader.read(e.consumed)
        if not fragments and line == b".\r\n":
            break
        num_bytes += len(line)
        if state == NOMINAL and size_limit and num_bytes > size_limit:
            state = TOO_MUCH
            data *= 0
        fragments.append(line)
        if line.endswith(b"\r\n"):
            if state == NOMINAL:
                joined = b"".join(fragments)
                if len(joined) > LIMIT:
                    state = TOO_LONG
                    data *= 0
                else:
                    data.append(bytearray(joined))
            fragments *= 0
    if state != NOMINAL:
        return b"", state
    for text in data:
        if text.startswith(b"."):
            del text[0]
    return b"".join(data), NOMINAL


TOKENS = [b"\r\n", b"\n", b"\r", b".", b"..", b"x", b"hello world", b"\r\n.", b".\r\n",
          b"\n.\n", b"\r.\r", b"\n.\r\n", b"\r\n..\r\n", b"\r\n.\n"]


def body(rng: random.Random) -> bytes:
    parts = []
    for _ in range(rng.randrange(0, 40)):
        r = rng.random()
        if r < 0.05:
            parts.append(b"y" * rng.choice([997, 998, 999, 1000, 1001, 1002, 2500]))
        else:
            parts.append(rng.choice(TOKENS))
    # it ends with CRLF, so the ".\r\n" appended after it is the terminator
    return b"".join(parts) + b"\r\n"


async def run(reader_fn, stream: bytes, pieces: list[int], size_limit: int,
              limit: int = LIMIT):
    reader = asyncio.StreamReader(limit=limit)
    task = asyncio.ensure_future(reader_fn(reader, size_limit))
    pos = 0
    for n in pieces:
        reader.feed_data(stream[pos:pos + n])
        pos += n
        await asyncio.sleep(0)
    reader.feed_data(stream[pos:])
    reader.feed_eof()
    result = await asyncio.wait_for(task, 10)
    rest = await reader.read()
    return result, rest


@pytest.mark.parametrize("limit", [LIMIT, 4096, DATA_LIMIT])
def test_same_outcome_as_aiosmtpd_line_reader(limit):
    """Also when our reader has the session's larger DATA limit (SessionReader)."""
    rng = random.Random(20261123)
    outcomes = {NOMINAL: 0, TOO_LONG: 0, TOO_MUCH: 0}

    async def main() -> None:
        for _ in range(1500):
            data = body(rng)
            stream = data + b".\r\n" + NEXT
            pieces = [rng.randrange(1, 700) for _ in range(rng.randrange(0, 12))]
            size_limit = rng.choice([0, 50, 2000, 100000])
            ours = await run(lambda r, s: read_data(r, s, LIMIT), stream, pieces, size_limit,
                             limit)
            ref = await run(reference, stream, pieces, size_limit)
            (got, got_state), got_rest = ours
            (want, want_state), want_rest = ref
            assert got_rest == want_rest, (stream, pieces)
            if {got_state, want_state} == {TOO_LONG, TOO_MUCH}:
                # both limits broken: which one is reported first may differ within one
                # read block (either is a permanent refusal of the same message)
                continue
            assert (got, got_state) == (want, want_state), (stream, pieces, size_limit)
            outcomes[want_state] += 1

    asyncio.run(main())
    # the corpus really exercises every outcome
    assert all(n > 20 for n in outcomes.values()), outcomes


def test_known_shapes():
    async def one(stream: bytes, size_limit: int = 0) -> tuple[tuple[bytes, str], bytes]:
        return await run(lambda r, s: read_data(r, s, LIMIT), stream, [], size_limit)

    async def main() -> None:
        assert await one(b".\r\n" + NEXT) == ((b"", NOMINAL), NEXT)
        assert await one(b"a\r\n..\r\n.b\r\n.\r\n" + NEXT) == ((b"a\r\n.\r\nb\r\n", NOMINAL), NEXT)
        # bare LF and bare CR dots do not end the message
        assert await one(b"a\n.\nb\r.\rc\r\n.\r\n" + NEXT) == (
            (b"a\n.\nb\r.\rc\r\n", NOMINAL), NEXT)
        assert await one(b"a\n.\r\nb\r\n.\r\n") == ((b"a\n.\r\nb\r\n", NOMINAL), b"")
        assert (await one(b"y" * 999 + b"\r\n.\r\n"))[0][1] == NOMINAL
        assert (await one(b"y" * 1000 + b"\r\n.\r\n"))[0][1] == TOO_LONG
        assert (await one((b"z" * 50 + b"\r\n") * 60 + b".\r\n", 2000))[0][1] == TOO_MUCH

    asyncio.run(main())
