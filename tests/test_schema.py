"""topology.schema: round trips, and every malformed file gets one InputError."""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from topology.errors import InputError
from topology.schema import load_topology, parse_topology, save_topology

FIXTURE = Path(__file__).parent / "fixtures" / "topology_small.yaml"


def valid() -> dict[str, Any]:
    return yaml.safe_load(FIXTURE.read_text())


def test_fixture_loads_with_all_parts() -> None:
    topology = load_topology(FIXTURE)
    assert [h.name for h in topology.hosts] == ["ib1", "ib2", "eth1"]
    assert topology.host("ib1").nics[0].kind == "infiniband"
    assert topology.host("eth1").nics[0].speed_gbps is None
    assert topology.link("eth1", "ib1").bandwidth_gbps == 0.05
    assert topology.link("ib2", "eth1").status == "unreachable"


def test_round_trip_keeps_content_and_digest(tmp_path: Path) -> None:
    original = load_topology(FIXTURE)
    out = tmp_path / "t.yaml"
    save_topology(original, out, header="written by a test")
    again = load_topology(out)
    assert again == original
    assert again.sha256() == original.sha256()
    assert out.read_text().startswith("# written by a test\n")


def test_digest_changes_with_content() -> None:
    data = valid()
    before = parse_topology(data).sha256()
    data["links"][0]["bandwidth_gbps"] = 100
    assert parse_topology(data).sha256() != before


def mutate(path: list[Any], value: Any) -> dict[str, Any]:
    data = valid()
    target = data
    for key in path[:-1]:
        target = target[key]
    if value is DELETE:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return data


DELETE = object()

BAD_CASES = [
    (["version"], 2, "version", "unsupported version 2"),
    (["version"], DELETE, "version", "Field required"),
    (["links", 0, "b"], "nowhere", "links[0].b", "unknown host 'nowhere'"),
    (["links", 0, "bandwidth_gbps"], -1, "links[0].bandwidth_gbps", "Gbit/s, got -1"),
    (["links", 0, "bandwidth_gbps"], 0, "links[0].bandwidth_gbps", "[1e-06, 100000] Gbit/s, got 0"),
    (["links", 0, "latency_ms"], -0.1, "links[0].latency_ms", "[0, 60000] ms, got -0.1"),
    (["hosts", 1, "name"], "ib1", "hosts[1].name", "duplicate host 'ib1'"),
    (["sites", 1, "name"], "dc1", "sites[1].name", "duplicate site 'dc1'"),
    (["hosts", 2, "site"], "dc9", "hosts[2].site", "unknown site 'dc9'"),
    (["hosts", 0, "nics", 0, "kind"], "omnipath", "hosts[0].nics[0].kind", "Input should be"),
    (["hosts", 0, "devices", 1, "name"], "cuda0", "hosts[0].devices[1].name", "duplicate device"),
    (["hosts", 0, "cpu_cores"], DELETE, "hosts[0]", "needs cpu_cores and memory_gb"),
    (["hosts", 0, "memroy_gb"], 1, "hosts[0].memroy_gb", "Extra inputs are not permitted"),
    (["links", 2, "reason"], DELETE, "links[2]", "needs a reason"),
    (["links", 1, "a"], "ib2", "links[2]", "duplicate link ib2-eth1 (also links[1])"),
]


@pytest.mark.parametrize(("path", "value", "field", "message"), BAD_CASES)
def test_bad_file_names_file_and_field(
    tmp_path: Path, path: list[Any], value: Any, field: str, message: str
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(mutate(path, value)))
    with pytest.raises(InputError) as caught:
        load_topology(bad)
    assert caught.value.path == str(bad)
    assert caught.value.field == field
    assert message in caught.value.message


@pytest.mark.parametrize(
    ("text", "message"),
    [("version: [1\n", "line 2"), ("- a\n- b\n", "expected a mapping"), ("", "got NoneType")],
)
def test_unparseable_files(tmp_path: Path, text: str, message: str) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    with pytest.raises(InputError, match=message):
        load_topology(bad)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="file not found"):
        load_topology(tmp_path / "absent.yaml")


scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 5), st.floats(allow_nan=True), st.text(max_size=5)
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=10,
)


def paths_of(data: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    if isinstance(data, dict):
        items = data.items()
    elif isinstance(data, list):
        items = enumerate(data)
    else:
        return []
    found = []
    for key, value in items:
        found.append((*prefix, key))
        found += paths_of(value, (*prefix, key))
    return found


ALL_PATHS = paths_of(valid())


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.sampled_from(ALL_PATHS), values)
def test_any_mutation_is_accepted_or_one_input_error(path: tuple[Any, ...], value: Any) -> None:
    data = copy.deepcopy(valid())
    target = data
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    try:
        parse_topology(data, "fuzz.yaml")
    except InputError as exc:
        assert exc.render().startswith("fuzz.yaml: ")


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.text(max_size=10), values, max_size=5))
def test_arbitrary_mappings_never_traceback(data: dict[str, Any]) -> None:
    with contextlib.suppress(InputError):
        parse_topology(data, "fuzz.yaml")
