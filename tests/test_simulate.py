"""Tests of skippipe.simulate: hand-computed timelines and invariants on random routes."""

from __future__ import annotations

import math
from collections import defaultdict

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from skippipe.simulate import Event, PipelineSpec, Route, SimResult, simulate


def spans(result: SimResult, node: str) -> list[tuple[str, int | None, float, float]]:
    """(kind, microbatch, start, end) of the compute events of ``node``, in time order."""
    return [(e.kind, e.microbatch, e.start, e.end) for e in result.timeline
            if e.node == node and e.kind != "send"]


def sends(result: SimResult, src: str, dst: str) -> list[tuple[int | None, float, float]]:
    return [(e.microbatch, e.start, e.end) for e in result.timeline
            if e.kind == "send" and (e.src, e.dst) == (src, dst)]


def approx_spans(expected):
    return [tuple(pytest.approx(x) if isinstance(x, float) else x for x in row)
            for row in expected]


def two_stage(microbatches: int, **overrides) -> PipelineSpec:
    """a (origin) -> b. forward a=1 s, b=2 s; backward ratio 2 (a=2 s, b=4 s); loss 0.5 s.
    1 MB per hop at 10 MB/s (0.1 s of wire) + 0.1 s latency = 0.2 s per transfer."""
    fields = dict(
        forward_s={"a": 1.0, "b": 2.0},
        routes=[Route(m, ("a", "b")) for m in range(microbatches)],
        activation_bytes=1e6,
        latency_s=lambda src, dst: 0.1,
        bandwidth_Bps={("a", "b"): 1e7},  # b->a falls back to the same measured link
        backward_ratio=2.0,
        loss_s=0.5,
    )
    fields.update(overrides)
    return PipelineSpec(**fields)


# ---------------------------------------------------------------- hand-computed cases


def test_single_node_runs_forward_loss_backward_per_microbatch():
    # One node, no transfers. Forward 1 s, loss 0.5 s, backward 2 s.
    # At t=1 the loss of mb 0 (backward side) beats the forward of mb 1:
    # F0 0-1, L0 1-1.5, B0 1.5-3.5, F1 3.5-4.5, L1 4.5-5, B1 5-7.
    spec = PipelineSpec(forward_s={"a": 1.0}, routes=[Route(0, ("a",)), Route(1, ("a",))],
                        activation_bytes=1e6, latency_s={}, bandwidth_Bps={}, loss_s=0.5)
    result = simulate(spec)
    assert spans(result, "a") == approx_spans([
        ("forward", 0, 0.0, 1.0), ("loss", 0, 1.0, 1.5), ("backward", 0, 1.5, 3.5),
        ("forward", 1, 3.5, 4.5), ("loss", 1, 4.5, 5.0), ("backward", 1, 5.0, 7.0),
    ])
    assert result.iteration_s == pytest.approx(7.0)
    assert result.busy_s == {"a": pytest.approx(7.0)}
    assert result.bytes_per_link == {}
    assert result.bubble_fraction() == pytest.approx(0.0)
    assert result.peak_in_flight == {"a": 1}


def test_two_stages_one_microbatch_by_hand():
    # a->b: 0.1 s latency + 1e6 B / 1e7 B/s = 0.2 s.  b->a: 0.1 + 1e6 / 2e7 = 0.15 s.
    # F a 0-1 | send a->b 1-1.2 | F b 1.2-3.2 | send b->a 3.2-3.35 | loss a 3.35-3.85 |
    # send a->b 3.85-4.05 | B b 4.05-8.05 | send b->a 8.05-8.2 | B a 8.2-10.2.
    spec = two_stage(1, bandwidth_Bps={("a", "b"): 1e7, ("b", "a"): 2e7})
    result = simulate(spec)
    assert spans(result, "a") == approx_spans([
        ("forward", 0, 0.0, 1.0), ("loss", 0, 3.35, 3.85), ("backward", 0, 8.2, 10.2)])
    assert spans(result, "b") == approx_spans([
        ("forward", 0, 1.2, 3.2), ("backward", 0, 4.05, 8.05)])
    assert sends(result, "a", "b") == approx_spans([(0, 1.0, 1.2), (0, 3.85, 4.05)])
    assert sends(result, "b", "a") == approx_spans([(0, 3.2, 3.35), (0, 8.05, 8.2)])
    assert result.iteration_s == pytest.approx(10.2)
    # busy a = 1 + 0.5 + 2 = 3.5, busy b = 2 + 4 = 6; each direction carries 2 hops of 1 MB.
    assert result.busy_s == {"a": pytest.approx(3.5), "b": pytest.approx(6.0)}
    assert result.bytes_per_link == {("a", "b"): 2e6, ("b", "a"): 2e6}
    assert result.bubble_fraction() == pytest.approx(1 - (3.5 + 6.0) / 2 / 10.2)


def test_two_stages_two_microbatches_by_hand():
    # Every transfer 0.2 s (0.1 wire + 0.1 latency), no contention (wires never overlap).
    # a: F0 0-1, F1 1-2.                         sends a->b: mb0 1-1.2, mb1 2-2.2
    # b: F0 1.2-3.2, F1 3.2-5.2 (mb1 waited since 2.2).   b->a: mb0 3.2-3.4
    # a: L0 3.4-3.9, grad a->b 3.9-4.1; B0 is ready at b at 4.1 but b is busy until 5.2.
    # b: F1 ends 5.2 -> send b->a 5.2-5.4; b runs B0 5.2-9.2.  a: L1 5.4-5.9, grad 5.9-6.1.
    # b: B0 ends 9.2 -> send 9.2-9.4, b runs B1 9.2-13.2.  a: B0 9.4-11.4.
    # b: B1 ends 13.2 -> send 13.2-13.4.  a: B1 13.4-15.4.  Iteration 15.4 s.
    result = simulate(two_stage(2))
    assert spans(result, "a") == approx_spans([
        ("forward", 0, 0.0, 1.0), ("forward", 1, 1.0, 2.0), ("loss", 0, 3.4, 3.9),
        ("loss", 1, 5.4, 5.9), ("backward", 0, 9.4, 11.4), ("backward", 1, 13.4, 15.4)])
    assert spans(result, "b") == approx_spans([
        ("forward", 0, 1.2, 3.2), ("forward", 1, 3.2, 5.2),
        ("backward", 0, 5.2, 9.2), ("backward", 1, 9.2, 13.2)])
    assert result.iteration_s == pytest.approx(15.4)
    # busy a = 2 * (1 + 0.5 + 2) = 7, busy b = 2 * (2 + 4) = 12; 4 hops of 1 MB each way.
    assert result.busy_s == {"a": pytest.approx(7.0), "b": pytest.approx(12.0)}
    assert result.bytes_per_link == {("a", "b"): 4e6, ("b", "a"): 4e6}
    assert result.peak_in_flight == {"a": 2, "b": 2}


def test_memory_limit_one_runs_microbatches_one_after_another():
    # With memory_limit a=1, mb 1 may start its forward at a only once mb 0's backward at a
    # ends. mb 0 alone takes 1+0.2+2+0.2+0.5+0.2+4+0.2+2 = 10.3 s, so mb 1 runs 10.3-20.6.
    result = simulate(two_stage(2, memory_limit={"a": 1}))
    assert spans(result, "a")[:3] == approx_spans([
        ("forward", 0, 0.0, 1.0), ("loss", 0, 3.4, 3.9), ("backward", 0, 8.3, 10.3)])
    assert spans(result, "a")[3] == approx_spans([("forward", 1, 10.3, 11.3)])[0]
    assert result.iteration_s == pytest.approx(20.6)
    assert result.peak_in_flight == {"a": 1, "b": 1}


def test_tail_runs_after_the_last_backward_of_its_node():
    # One microbatch of the symmetric case ends at 10.3 (B a 8.3-10.3, B b 4.1-8.1).
    result = simulate(two_stage(1, tail_s={"a": 1.0, "b": 0.5}))
    tails = {e.node: (e.start, e.end) for e in result.timeline if e.kind == "tail"}
    assert tails == {"a": approx_spans([(10.3, 11.3)])[0], "b": approx_spans([(8.1, 8.6)])[0]}
    assert result.iteration_s == pytest.approx(11.3)
    assert result.busy_s == {"a": pytest.approx(3.5), "b": pytest.approx(6.0)}  # tail excluded


def test_one_directed_link_serializes_its_wire_and_pipelines_latency():
    # Forward 0.1 s everywhere; each hop: 1 s of wire (1e6 B at 1e6 B/s) + 0.5 s latency.
    # mb0 sends a->b at 0.1, its wire frees at 1.1, it arrives at 1.6.
    # mb1 is ready to send at 0.2 but the a->b wire is busy: it starts at 1.1, arrives 2.6.
    spec = PipelineSpec(forward_s={"a": 0.1, "b": 0.1},
                        routes=[Route(0, ("a", "b")), Route(1, ("a", "b"))],
                        activation_bytes=1e6, latency_s=lambda s, d: 0.5,
                        bandwidth_Bps=lambda s, d: 1e6, backward_ratio=1.0)
    result = simulate(spec)
    assert sends(result, "a", "b")[:2] == approx_spans([(0, 0.1, 1.6), (1, 1.1, 2.6)])
    assert spans(result, "b")[:2] == approx_spans([
        ("forward", 0, 1.6, 1.7), ("forward", 1, 2.6, 2.7)])


def test_transfers_to_one_node_over_different_pairs_overlap():
    # a->c and b->c are different channels: both 1 s transfers run 1-2 at once.
    spec = PipelineSpec(forward_s={"a": 1.0, "b": 1.0, "c": 1.0},
                        routes=[Route(0, ("a", "c")), Route(1, ("b", "c"))],
                        activation_bytes=1e6, latency_s=lambda s, d: 0.0,
                        bandwidth_Bps=lambda s, d: 1e6)
    result = simulate(spec)
    assert sends(result, "a", "c")[0] == approx_spans([(0, 1.0, 2.0)])[0]
    assert sends(result, "b", "c")[0] == approx_spans([(1, 1.0, 2.0)])[0]


def test_backward_beats_forward_then_lower_microbatch_first():
    # a: forward 0.5, b: forward 1; backward ratio 1; loss 0.25; free links (0 bytes, 0 latency).
    # a: F0 0-.5, F1 .5-1, F2 1-1.5.  b: F0 .5-1.5, F1 1.5-2.5 (only forwards were ready).
    # a: L0 1.5-1.75, so B0 is ready at b from 1.75; L1 2.5-2.75, B1 ready from 2.75.
    # At 2.5 b has B0 and F2 ready -> B0 (2.5-3.5), though F2 has waited since 1.5.
    # At 3.5 b has B1 and F2 ready -> B1 (3.5-4.5). Then F2 4.5-5.5, L2 5.5-5.75, B2 5.75-6.75.
    # Routes are given out of order: priority uses microbatch ids, not list order.
    spec = PipelineSpec(forward_s={"a": 0.5, "b": 1.0},
                        routes=[Route(m, ("a", "b")) for m in (2, 0, 1)],
                        activation_bytes=0.0, latency_s=lambda s, d: 0.0,
                        bandwidth_Bps=lambda s, d: 1e9, backward_ratio=1.0, loss_s=0.25)
    result = simulate(spec)
    assert spans(result, "b") == approx_spans([
        ("forward", 0, 0.5, 1.5), ("forward", 1, 1.5, 2.5), ("backward", 0, 2.5, 3.5),
        ("backward", 1, 3.5, 4.5), ("forward", 2, 4.5, 5.5), ("backward", 2, 5.75, 6.75)])
    assert [(k, m) for k, m, _, _ in spans(result, "a")][:3] == [
        ("forward", 0), ("forward", 1), ("forward", 2)]
    # a: B0 3.5-4, B1 4.5-5, B2 6.75-7.25.
    assert result.iteration_s == pytest.approx(7.25)


def test_routes_of_different_lengths_skip_and_reorder_nodes():
    # mb0 visits o, n1, n2; mb1 skips n1; mb2 swaps the order (o, n2, n1).
    # All forwards 1 s, backward ratio 1, free links: mb1 alone would take 1+1+1+1 = 4 s.
    spec = PipelineSpec(forward_s={"o": 1.0, "n1": 1.0, "n2": 1.0},
                        routes=[Route(0, ("o", "n1", "n2")), Route(1, ("o", "n2")),
                                Route(2, ("o", "n2", "n1"))],
                        activation_bytes=10.0, latency_s=lambda s, d: 0.0,
                        bandwidth_Bps=lambda s, d: math.inf, backward_ratio=1.0)
    result = simulate(spec)
    mb1 = [(e.kind, e.node, e.dst) for e in result.timeline if e.microbatch == 1]
    assert mb1 == [("forward", "o", None), ("send", "o", "n2"), ("forward", "n2", None),
                   ("send", "n2", "o"), ("loss", "o", None), ("send", "o", "n2"),
                   ("backward", "n2", None), ("send", "n2", "o"), ("backward", "o", None)]
    assert {e.microbatch for e in result.timeline if e.node == "n1"} == {0, 2}
    # o->n2: mb1 (fwd + grad), mb2 (fwd), mb0 (grad) = 4 hops of 10 B.
    # n1->n2: mb0's forward, mb2's gradient; n2->n1: mb2's forward, mb0's gradient.
    assert result.bytes_per_link[("o", "n2")] == 40.0
    assert result.bytes_per_link[("n1", "n2")] == 20.0
    assert result.bytes_per_link[("n2", "n1")] == 20.0
    assert ("o", "n1") in result.bytes_per_link and ("n1", "o") in result.bytes_per_link
    assert result.busy_s == {"o": 6.0, "n1": 4.0, "n2": 6.0}


def test_without_timeline_gives_the_same_numbers():
    spec = two_stage(3, memory_limit={"a": 2})
    full, lean = simulate(spec), simulate(spec, record_timeline=False)
    assert lean.timeline == []
    assert (lean.iteration_s, lean.busy_s, lean.bytes_per_link, lean.peak_in_flight) == (
        full.iteration_s, full.busy_s, full.bytes_per_link, full.peak_in_flight)


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(("overrides", "message"), [
    ({"routes": [Route(0, ("a", "z"))]}, "microbatch 0 names node 'z'"),
    ({"routes": [Route(0, ("a", "b", "a"))]}, "visits node 'a' more than once"),
    ({"routes": [Route(0, ("a",)), Route(0, ("a", "b"))]}, "microbatch 0 has more than one"),
    ({"routes": [Route(3, ())]}, "route of microbatch 3 is empty"),
    ({"routes": []}, "no routes"),
    ({"forward_s": {"a": -1.0, "b": 2.0}}, "forward_s['a']"),
    ({"forward_s": {"a": math.nan, "b": 2.0}}, "forward_s['a']"),
    ({"activation_bytes": -5.0}, "activation_bytes"),
    ({"bandwidth_Bps": {("a", "b"): 0.0}}, "bandwidth_Bps of link a->b must be > 0"),
    ({"bandwidth_Bps": {("a", "c"): 1e6}}, "no bandwidth_Bps for link a->b"),
    ({"latency_s": lambda s, d: math.inf}, "latency_s of link a->b"),
    ({"latency_s": lambda s, d: {}[(s, d)]}, "no latency_s for link a->b"),
    ({"memory_limit": {"q": 1}}, "memory_limit names node 'q'"),
    ({"memory_limit": {"a": 1.5}}, "memory_limit['a'] must be an integer"),
    ({"memory_limit": {"b": 0}}, "visits node 'b', whose memory_limit is 0"),
    ({"tail_s": {"q": 1.0}}, "tail_s names node 'q'"),
    ({"loss_s": {"a": -1.0}}, "loss_s['a']"),
])
def test_bad_input_raises_a_clear_value_error(overrides, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        simulate(two_stage(1, **overrides))


def test_deadlock_names_the_stuck_microbatches_and_nodes():
    # mb0 holds a and needs b; mb1 holds b and needs a; each node holds one microbatch.
    spec = two_stage(0, routes=[Route(0, ("a", "b")), Route(1, ("b", "a"))],
                     memory_limit={"a": 1, "b": 1})
    with pytest.raises(ValueError, match="deadlock") as error:
        simulate(spec)
    text = str(error.value)
    assert "microbatch 0 waits to start its forward on node 'b'" in text
    assert "microbatch 1 waits to start its forward on node 'a'" in text


# ---------------------------------------------------------------- invariants (hypothesis)

NODES = ("n0", "n1", "n2", "n3")
QUARTERS = st.integers(0, 12).map(lambda q: q / 4)  # 0 included: zero-time tasks keep order


@st.composite
def specs(draw) -> PipelineSpec:
    routes = []
    for mb in range(draw(st.integers(1, 5))):
        order = draw(st.permutations(NODES))
        routes.append(Route(mb, tuple(order[: draw(st.integers(1, len(NODES)))])))
    pairs = [(s, d) for s in NODES for d in NODES if s != d]
    limits = draw(st.none() | st.fixed_dictionaries({n: st.integers(1, 3) for n in NODES}))
    return PipelineSpec(
        forward_s={n: draw(QUARTERS) for n in NODES},
        routes=routes,
        activation_bytes=draw(st.sampled_from([1.0, 4.0])),
        latency_s={p: draw(st.sampled_from([0.0, 0.25, 1.0])) for p in pairs},
        bandwidth_Bps={p: draw(st.sampled_from([1.0, 4.0, math.inf])) for p in pairs},
        backward_ratio=draw(st.sampled_from([1.0, 2.0])),
        loss_s=draw(QUARTERS),
        memory_limit=limits,
    )


def expected_chain(nodes: tuple[str, ...]) -> list[tuple[str, str, str | None]]:
    """(kind, node, dst) of one microbatch's events, in the order the model prescribes."""
    chain: list[tuple[str, str, str | None]] = []
    for i, node in enumerate(nodes):
        if i:
            chain.append(("send", nodes[i - 1], node))
        chain.append(("forward", node, None))
    if len(nodes) > 1:
        chain.append(("send", nodes[-1], nodes[0]))
    chain.append(("loss", nodes[0], None))
    if len(nodes) > 1:
        chain.append(("send", nodes[0], nodes[-1]))
    for i in range(len(nodes) - 1, -1, -1):
        if i < len(nodes) - 1:
            chain.append(("send", nodes[i + 1], nodes[i]))
        chain.append(("backward", nodes[i], None))
    return chain


def check_chains(spec: PipelineSpec, result: SimResult) -> None:
    by_mb: dict[int | None, list[Event]] = defaultdict(list)
    for event in result.timeline:
        by_mb[event.microbatch].append(event)
    for route in spec.routes:
        events = by_mb[route.microbatch]
        assert [(e.kind, e.node, e.dst) for e in events] == expected_chain(route.nodes)
        for before, after in zip(events, events[1:], strict=False):
            assert after.start >= before.end - 1e-9


def check_resources(spec: PipelineSpec, result: SimResult) -> None:
    compute: dict[str, list[Event]] = defaultdict(list)
    links: dict[tuple[str, str], list[Event]] = defaultdict(list)
    for e in result.timeline:
        if e.kind == "send":
            links[(e.src, e.dst)].append(e)
        else:
            compute[e.node].append(e)
    for node, events in compute.items():
        for before, after in zip(events, events[1:], strict=False):
            assert after.start >= before.end - 1e-9, f"overlap on {node}"
        assert sum(e.end - e.start for e in events) == pytest.approx(result.busy_s[node])
        ratio = {"forward": 1.0, "backward": spec.backward_ratio}
        for e in events:
            if e.kind in ratio:
                assert e.end - e.start == pytest.approx(ratio[e.kind] * spec.forward_s[node])
    for pair, events in links.items():
        wire = spec.activation_bytes / spec.bandwidth_Bps[pair]
        for e in events:
            assert e.end - e.start == pytest.approx(wire + spec.latency_s[pair])
        for before, after in zip(events, events[1:], strict=False):
            assert after.start >= before.start + wire - 1e-9, f"wire overlap on {pair}"
        assert result.bytes_per_link[pair] == len(events) * spec.activation_bytes


def check_memory(spec: PipelineSpec, result: SimResult) -> None:
    """Replay each node's compute (serial, so in timeline order): +1 at a forward's start,
    -1 at a backward's end, which precedes the node's next task."""
    for node in spec.forward_s:
        level = peak = 0
        for e in result.timeline:
            if e.node == node and e.kind in ("forward", "backward"):
                level += 1 if e.kind == "forward" else -1
                peak = max(peak, level)
        assert level == 0
        assert peak == result.peak_in_flight[node]
        if spec.memory_limit:
            assert peak <= spec.memory_limit[node]


@settings(max_examples=300, deadline=None)
@given(specs())
def test_random_routes_respect_every_invariant(spec: PipelineSpec):
    try:
        result = simulate(spec)
    except ValueError as error:
        assert spec.memory_limit is not None and "deadlock" in str(error)
        return
    check_chains(spec, result)
    check_resources(spec, result)
    check_memory(spec, result)
    assert result.iteration_s == max(e.end for e in result.timeline)
    assert 0.0 <= result.bubble_fraction() <= 1.0
    assert simulate(spec) == result  # deterministic


def test_loss_on_the_last_node_skips_the_round_trip() -> None:
    # a -> b, forward 1 s each, backward 2 s each, loss 0.5 s on b, link 0.1 s + 1 MB / 10 MB/s.
    # F_a 0-1, send 1-1.2, F_b 1.2-2.2, loss 2.2-2.7 on b, B_b 2.7-4.7, send 4.7-4.9,
    # B_a 4.9-6.9: 6.9 s, one transfer each way (at the origin it would be 10.2 s + 2 more).
    spec = PipelineSpec(
        forward_s={"a": 1.0, "b": 1.0}, routes=[Route(0, ("a", "b"))],
        activation_bytes=1e6, latency_s=lambda s, d: 0.1, bandwidth_Bps=lambda s, d: 1e7,
        loss_s={"b": 0.5}, loss_at="last")
    result = simulate(spec)
    assert result.iteration_s == pytest.approx(6.9)
    assert result.bytes_per_link == {("a", "b"): 1e6, ("b", "a"): 1e6}
    assert [e.kind for e in result.timeline if e.node == "b" and e.kind != "send"] == [
        "forward", "loss", "backward"]
