"""Stop strings and held-back text of the incremental detokenizer."""

from __future__ import annotations

from collections.abc import Sequence

from runtime.engine.detokenize import TextStream

VOCAB = ["Hel", "lo", " wor", "ld", "!", "\n", "EN", "D", "x"]


def decode(ids: Sequence[int]) -> str:
    return "".join(VOCAB[i] for i in ids)


def run(stream: TextStream, ids: list[int]) -> list[str]:
    return [stream.push(i) for i in ids]


def test_without_stops_every_token_is_released_at_once() -> None:
    stream = TextStream(decode)
    assert run(stream, [0, 1, 2, 3]) == ["Hel", "lo", " wor", "ld"]
    assert stream.flush() == ""


def test_stop_string_across_tokens_is_never_shown() -> None:
    stream = TextStream(decode, stop=["END"])
    deltas = run(stream, [0, 1, 6])
    # "EN" could start "END": held back until the next token decides
    assert deltas == ["Hel", "lo", ""]
    assert stream.push(7) == ""
    assert stream.stopped
    assert stream.emitted == len("Hello")


def test_held_prefix_is_released_when_it_does_not_become_the_stop() -> None:
    stream = TextStream(decode, stop=["END"])
    assert run(stream, [6, 8]) == ["", "ENx"]


def test_flush_releases_held_text_when_generation_ends_for_another_reason() -> None:
    stream = TextStream(decode, stop=["END"])
    assert run(stream, [0, 6]) == ["Hel", ""]
    assert stream.flush() == "EN"


def test_stop_inside_one_token_cuts_the_text_before_it() -> None:
    stream = TextStream(decode, stop=["o w"])
    assert run(stream, [0, 1]) == ["Hel", "l"]
    assert stream.push(2) == ""
    assert stream.stopped and stream.emitted == len("Hell")


def test_a_resumed_stream_continues_where_the_first_stopped() -> None:
    first = TextStream(decode, stop=["!"])
    before = run(first, [0, 1, 2])
    resumed = TextStream(decode, stop=["!"], token_ids=first.token_ids, emitted=first.emitted)
    after = run(resumed, [3, 4, 5])
    assert "".join(before + after) == "Hello world"
    assert resumed.stopped


def test_unfinished_multibyte_character_is_held() -> None:
    data = "é".encode()

    def byte_decode(ids: Sequence[int]) -> str:
        return bytes(data[i] for i in ids).decode("utf-8", errors="replace")

    stream = TextStream(byte_decode)
    assert stream.push(0) == ""
    assert stream.push(1) == "é"
