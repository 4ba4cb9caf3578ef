"""TLS records from a byte stream (guard/core/records.py): the relay's and analyze's one framer."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from guard.core.records import NOT_TLS, CapturedStream, RecordFramer, StreamAssembler


def record(body: int, ctype: int = 23) -> bytes:
    return bytes([ctype, 3, 3]) + body.to_bytes(2, "big") + b"\xaa" * body


def test_records_across_chunks_complete_at_their_last_byte() -> None:
    stream = record(512, 22) + record(233) + record(4000) + record(33)
    f = RecordFramer()
    out = f.feed(stream[:3]) + f.feed(stream[3:600]) + f.feed(stream[600:])
    assert [(r.size, r.content_type) for r in out] == [(517, 22), (238, 23), (4005, 23), (38, 23)]
    assert [r.end for r in out] == [517, 755, 4760, 4798]
    assert f.pending == 0


def test_an_incomplete_record_is_pending() -> None:
    f = RecordFramer()
    assert f.feed(record(100)[:50]) == []
    assert f.pending == 50


def test_a_stream_that_is_not_tls_is_taken_chunk_by_chunk() -> None:
    f = RecordFramer()
    out = f.feed(b"GET / HTTP/1.1\r\n\r\n") + f.feed(b"x" * 10)
    assert [(r.end, r.size, r.content_type) for r in out] == [(18, 18, NOT_TLS), (28, 10, NOT_TLS)]


def test_a_bad_header_mid_stream_falls_back_and_resynchronises_at_a_chunk_start() -> None:
    f = RecordFramer()
    out = f.feed(record(10) + b"\x00" * 7)
    assert [(r.size, r.content_type) for r in out] == [(15, 23), (7, NOT_TLS)]
    assert f.feed(record(20)) and f.tls


def test_a_chunk_cut_by_the_snap_length_is_a_record_of_its_real_size() -> None:
    f = RecordFramer(tls=True)
    [r] = f.feed(record(1400)[:64], length=1405)
    assert (r.end, r.size, r.content_type) == (1405, 1405, NOT_TLS)


@given(st.lists(st.integers(1, 3000), min_size=1, max_size=20), st.data())
def test_any_chunking_gives_the_same_records(bodies: list[int], data: st.DataObject) -> None:
    stream = b"".join(record(b) for b in bodies)
    cuts = sorted(set(data.draw(st.lists(st.integers(1, len(stream) - 1), max_size=30))))
    f = RecordFramer()
    out = []
    for a, b in zip([0, *cuts], [*cuts, len(stream)]):
        out += f.feed(stream[a:b])
    assert [r.size for r in out] == [b + 5 for b in bodies]
    assert sum(r.size for r in out) == len(stream)


def test_assembler_drops_retransmissions_and_trims_overlaps() -> None:
    a = StreamAssembler()
    a.syn(0xFFFFFFF0)  # wraps
    assert a.segment(0xFFFFFFF1, b"abcd", 4) == (b"abcd", 4, False)
    assert a.segment(0xFFFFFFF1, b"abcd", 4) == (b"", 0, False)  # retransmission
    assert a.segment(0xFFFFFFF3, b"cdef", 4) == (b"ef", 2, False)  # overlap trimmed
    assert a.segment(0xFFFFFFF7 + 10, b"zz", 2) == (b"zz", 2, True)  # a gap


def test_an_empty_record_is_a_record() -> None:
    """TLS 1.2 allows empty application_data records (the 1/n-1 split's sibling)."""
    f = RecordFramer()
    out = f.feed(record(10) + record(0) + record(2, 21))
    assert [(r.end, r.size, r.content_type) for r in out] == [(15, 15, 23), (20, 5, 23),
                                                              (27, 7, 21)]


def test_a_captured_stream_frames_in_order_drops_retransmissions_and_resyncs_after_a_gap() -> None:
    s = CapturedStream()
    s.syn(999)
    first = record(100) + record(20)[:10]
    data, recs = s.segment(1000, first, len(first))
    assert data == first and [r.size for r in recs] == [105]
    assert s.segment(1000, first, len(first)) == (b"", [])  # a retransmission
    later = record(30)  # bytes before it were lost: it starts a record of its own
    _, recs = s.segment(1000 + len(first) + 500, later, len(later))
    assert [(r.size, r.content_type) for r in recs] == [(35, 23)]
