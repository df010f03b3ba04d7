"""Pipeline schedules as data: built, checked, simulated and drawn in one process (no torch, no ranks)."""

import re

import pytest

from meshlm.parallel.schedules import (
    Action,
    ScheduleError,
    Timeline,
    build,
    check,
    draw,
    format_table,
    simulate,
    with_communication,
)


def cases():
    """(schedule, p, m, v) for p in (1, 2, 4), m in (p, 2p, 8); interleaved with v = 2 where m % p == 0."""
    for p in (1, 2, 4):
        for m in sorted({p, 2 * p, 8}):
            yield "gpipe", p, m, 1
            yield "1f1b", p, m, 1
            yield "zb", p, m, 1
            if m % p == 0:
                yield "interleaved", p, m, 2
    yield "1f1b", 4, 2, 1  # fewer micro-batches than ranks: degenerates towards GPipe
    yield "zb", 4, 3, 1
    yield "interleaved", 4, 8, 3


@pytest.mark.parametrize("schedule, p, m, v", list(cases()))
def test_every_schedule_passes_check(schedule, p, m, v):
    table = build(schedule, p=p, m=m, v=v)
    check(table, p=p, m=m, v=v)
    simulate(table)  # and runs under the runtime contract (sends waited for at the next batch)


def test_communication_placement():
    """The convention the runtime follows: SEND right after its producer, RECV right before its consumer."""
    assert format_table(build("1f1b", p=2, m=2)) == (
        "rank 0: F0.0 SEND_F0.0->1 F1.0 SEND_F1.0->1 RECV_B0.0<-1 B0.0 RECV_B1.0<-1 B1.0\n"
        "rank 1: RECV_F0.0<-0 F0.0 B0.0 SEND_B0.0->0 RECV_F1.0<-0 F1.0 B1.0 SEND_B1.0->0"
    )
    # interleaved batches per 1F1B step, as Megatron: after F and B, both sends, then both receives
    rank0 = " ".join(map(str, build("interleaved", p=2, m=4, v=2)[0]))
    assert "F2.1 B0.0 SEND_F2.1->1 RECV_F3.1<-1 RECV_B1.0<-1 F3.1" in rank0
    # p = 1: chunks hand over locally, nothing to send
    assert all(a.is_compute for a in build("interleaved", p=1, m=2, v=2)[0])


@pytest.mark.parametrize("schedule, p, m, v", [("1f1b", 4, 8, 1), ("interleaved", 4, 8, 2), ("zb", 4, 8, 1)])
def test_batches_are_sends_then_receives(schedule, p, m, v):
    """Between two computations: at most one SEND and one RECV per direction, sends first."""
    for actions in build(schedule, p=p, m=m, v=v):
        batch = []
        for a in actions + [Action("F", 0)]:
            if not a.is_compute:
                batch.append(a.kind)
                continue
            kinds = [k.split("_")[0] for k in batch]
            assert kinds == sorted(kinds, reverse=True), batch  # SEND... before RECV...
            assert len(batch) == len(set(batch)) <= 4, batch
            batch = []


def _without(table, rank, text):
    table = [list(actions) for actions in table]
    table[rank].remove(Action.parse(text))
    return table


def _swap(table, rank, first, second):
    table = [list(actions) for actions in table]
    i, j = table[rank].index(Action.parse(first)), table[rank].index(Action.parse(second))
    table[rank][i], table[rank][j] = table[rank][j], table[rank][i]
    return table


ONE_F_ONE_B = build("1f1b", p=2, m=4)
ZB = build("zb", p=2, m=4)
# two ranks that each receive before they send
CROSSED = [[Action.parse(a) for a in ["RECV_B0.0<-1", "F0.0", "SEND_F0.0->1", "B0.0"]],
           [Action.parse(a) for a in ["RECV_F0.0<-0", "F0.0", "B0.0", "SEND_B0.0->0"]]]


@pytest.mark.parametrize("table, m, message", [
    (_without(ONE_F_ONE_B, 1, "F3.0"), 4, "rank 1 has no F3.0"),
    (_without(ZB, 1, "W2.0"), 4, "rank 1 has no W2.0"),
    (_swap(ONE_F_ONE_B, 1, "F1.0", "B1.0"), 4, "rank 1: B1.0 comes before F1.0"),
    (_without(ONE_F_ONE_B, 0, "SEND_F2.0->1"), 4, "rank 1: RECV_F2.0<-0 has no matching SEND on rank 0"),
    (_without(ONE_F_ONE_B, 1, "RECV_F2.0<-0"), 4, "rank 0: SEND_F2.0->1 has no matching RECV on rank 1"),
    (_without(_without(ONE_F_ONE_B, 1, "RECV_F2.0<-0"), 0, "SEND_F2.0->1"), 4, "rank 0: missing SEND_F2.0->1"),
    (_swap(ONE_F_ONE_B, 0, "SEND_F0.0->1", "SEND_F1.0->1"), 4,
     ("rank 0: SEND_F1.0->1 would be received by RECV_F0.0<-0 on rank 1 "
     "(sends and receives between two ranks must be posted in the same order)")),
    (_swap(ONE_F_ONE_B, 0, "SEND_F1.0->1", "F1.0"), 4, "rank 0: SEND_F1.0->1 comes before F1.0"),
    (CROSSED, 1, ("deadlock: rank 0 at RECV_B0.0<-1 (rank 1 has not posted the matching SEND); "
                 "rank 1 at RECV_F0.0<-0 (rank 0 has not posted the matching SEND)")),
    (ONE_F_ONE_B[:1], 4, "table has 1 ranks, expected p (2)"),
])
def test_check_catches_broken_tables(table, m, message):
    with pytest.raises(ScheduleError, match=f"^{re.escape(message)}$"):
        check(table, p=2, m=m)


def test_check_catches_a_receive_after_its_consumer():
    table = _swap(ONE_F_ONE_B, 1, "RECV_F2.0<-0", "F2.0")
    message = ("deadlock: rank 0 at SEND_F2.0->1 (rank 1 has not posted the matching RECV); "
               "rank 1 at F2.0 (no RECV_F2.0 ran before it)")
    with pytest.raises(ScheduleError, match=f"^{re.escape(message)}$"):
        check(table, p=2, m=4)


@pytest.mark.parametrize("call, message", [
    (lambda: build("interleaved", p=4, m=6, v=2), "m (6) must be a multiple of p (4) for the interleaved schedule"),
    (lambda: build("zigzag", p=2, m=2), "schedule ('zigzag') must be one of gpipe, 1f1b, interleaved, zb"),
    (lambda: build("1f1b", p=2, m=4, v=2), "v (2) needs schedule 'interleaved' (schedule is '1f1b')"),
    (lambda: build("gpipe", p=0, m=4), "p (0) must be a positive integer"),
    (lambda: build("zb", p=2, m=0), "m (0) must be a positive integer"),
    (lambda: with_communication(build("1f1b", p=2, m=2), p=2), "rank 0: SEND_F0.0->1 is already a communication"),
])
def test_bad_arguments(call, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        call()


# ---- known values (t_comm = 0) ------------------------------------------------------------------

@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize("p, m", [(1, 4), (2, 2), (2, 8), (4, 2), (4, 4), (4, 8), (8, 16)])
def test_gpipe_and_1f1b_bubble(schedule, p, m):
    for t_b in (1.0, 2.0):
        for overlap in (True, False):
            bubble = simulate(build(schedule, p=p, m=m), t_f=1, t_b=t_b, overlap_sends=overlap).bubble
            assert bubble == pytest.approx((p - 1) / (m + p - 1), abs=1e-9)


@pytest.mark.parametrize("p, m, v", [(2, 2, 2), (2, 8, 2), (4, 4, 2), (4, 8, 2), (4, 8, 3), (4, 16, 4), (8, 8, 2)])
def test_interleaved_bubble(p, m, v):
    """Narayanan et al. 2021: the bubble time (p-1)(t_f+t_b) is divided by v."""
    bubble = simulate(build("interleaved", p=p, m=m, v=v)).bubble
    assert bubble == pytest.approx((p - 1) / (v * m + p - 1), abs=1e-9)
    one_f_one_b = simulate(build("1f1b", p=p, m=m))
    assert bubble < one_f_one_b.bubble
    # each chunk costs 1/v of a rank's share: the same work, the bubble time (p-1)(t_f+t_b) divided by v
    assert simulate(build("interleaved", p=p, m=m, v=v)).makespan == pytest.approx(m * 3 + (p - 1) * 3 / v)


@pytest.mark.parametrize("p, m", [(2, 4), (4, 4), (4, 8), (4, 16), (8, 16)])
@pytest.mark.parametrize("t_w", [0.5, 1.0])
def test_zb_h1_bubble(p, m, t_w):
    """Qi et al. 2024: ZB-H1 idles (p-1)(t_f+t_b-t_w) per rank, against 1F1B's (p-1)(t_f+t_b+t_w)."""
    times = {"t_f": 1.0, "t_b": 1.0, "t_w": t_w}
    zb, one_f_one_b = simulate(build("zb", p=p, m=m), **times), simulate(build("1f1b", p=p, m=m), **times)
    idle = (p - 1) * (1 + 1 - t_w)
    assert zb.bubble == pytest.approx(idle / (m * (2 + t_w) + idle), abs=1e-9)
    assert zb.bubble < one_f_one_b.bubble
    assert one_f_one_b.makespan == (m + p - 1) * (2 + t_w)  # B costs t_b + t_w when it is not split


def test_zb_needs_sends_overlapped_with_w():
    """Waiting for each send at once is deadlock-free but stalls the deferred W's: ZB-H1 falls back to 1F1B."""
    zb = build("zb", p=4, m=8)
    strict = simulate(zb, t_b=1, t_w=1, overlap_sends=False).bubble
    assert strict > simulate(zb, t_b=1, t_w=1).bubble
    assert strict == pytest.approx(simulate(build("1f1b", p=4, m=8), t_b=1, t_w=1).bubble)


def test_peak_in_flight():
    p, m = 4, 8
    assert simulate(build("gpipe", p=p, m=m)).peak_in_flight == [m] * p
    assert simulate(build("1f1b", p=p, m=m)).peak_in_flight == [p - r for r in range(p)]
    assert simulate(build("zb", p=p, m=m), t_b=1, t_w=1).peak_in_flight == [p - r for r in range(p)]
    assert simulate(build("1f1b", p=p, m=2)).peak_in_flight == [2, 2, 2, 1]
    for v in (2, 3):  # Megatron's warm-up: 2(p - r - 1) + (v - 1)p forwards, then one more
        peaks = simulate(build("interleaved", p=p, m=m, v=v)).peak_in_flight
        assert peaks == [min(2 * (p - r - 1) + (v - 1) * p + 1, m * v) for r in range(p)]


def test_communication_time_adds_to_the_bubble():
    table = build("1f1b", p=4, m=8)
    slow = simulate(table, t_comm=0.1)
    assert slow.bubble > simulate(table).bubble
    assert slow.makespan > (8 + 3) * 3


# ---- timelines ----------------------------------------------------------------------------------

def test_action_strings_round_trip():
    for text in ("F3.0", "B3.1", "W0.0", "SEND_F3.0->1", "RECV_B2.1<-0"):
        assert str(Action.parse(text)) == text
    with pytest.raises(ValueError, match=re.escape("action ('X1') must look like")):
        Action.parse("X1")


def test_timeline_from_measured_records():
    simulated = simulate(build("1f1b", p=2, m=4))
    records = [(e.rank, str(e.action), 100 + e.start, 100 + e.end) for e in simulated.events]
    measured = Timeline.from_records(records)
    assert measured.p == 2
    assert measured.makespan == simulated.makespan
    assert measured.bubble == pytest.approx(simulated.bubble)
    assert measured.peak_in_flight == simulated.peak_in_flight
    assert measured.busy == simulated.busy


def test_draw_writes_png(tmp_path):
    for name, timeline in [("interleaved", simulate(build("interleaved", p=4, m=8, v=2))),
                           ("zb", simulate(build("zb", p=4, m=8), t_b=1, t_w=1)),
                           ("measured", Timeline.from_records([(0, "F0.0", 0.5, 1.0), (1, "B0.0", 1.2, 2.0)]))]:
        path = draw(timeline, tmp_path / f"{name}.png", title=name)
        data = path.read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 1000
