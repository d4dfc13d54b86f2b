"""holmes.assumptions: every cost assumption moves the estimate the way it should, on a
2-stage pipeline computed by hand; profiles, files and the CLI refuse bad ones cleanly."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from cli.main import cli
from holmes import costs
from holmes.assumptions import CostAssumptions, default_costs, list_profiles, load_costs
from holmes.estimate import Context, estimate
from holmes.fabric import find_fabrics
from holmes.model import parse_model
from holmes.network import Network
from holmes.partition import Partition
from holmes.placement import Layout
from topology.errors import InputError
from topology.schema import Topology

SECONDS_PER_LAYER = 0.01  # measured forward seconds per layer per sample
LATENCY_MS, GBPS = 10.0, 0.01
LAYERS = (2, 2)


def two_hosts() -> Topology:
    hosts = [{"name": name, "site": name[0], "address": f"10.0.{i}.1", "cpu_cores": 4,
              "memory_gb": 64, "devices": [{"name": "cpu0", "kind": "cpu", "memory_gb": 64,
                                            "tflops": 1.0}],
              "nics": [{"name": "eth0", "kind": "ethernet", "state": "up", "netdev": "eth0"}]}
             for i, name in enumerate(("a1", "b1"))]
    return Topology.model_validate({
        "version": 1, "sites": [{"name": "a"}, {"name": "b"}], "hosts": hosts,
        "links": [{"a": "a1", "b": "b1", "latency_ms": LATENCY_MS, "bandwidth_gbps": GBPS}]})


def model(microbatches: int) -> Any:
    return parse_model({
        "version": 1,
        "model": {"name": "m", "arch": "gpt", "layers": 4, "hidden": 64, "heads": 4,
                  "ffn": 256, "vocab": 256, "seq_len": 64, "dtype": "fp32",
                  "seconds_per_layer_per_sample": SECONDS_PER_LAYER},
        "training": {"global_batch": microbatches, "microbatch": 1, "steps": 1,
                     "recompute": "none"}})


def iteration(assumptions: CostAssumptions, microbatches: int = 1) -> tuple[float, Any]:
    """Simulated seconds of the 2-stage pipeline a1 -> b1 (head on b1), 2 + 2 layers."""
    topology, config = two_hosts(), model(microbatches)
    fabrics = find_fabrics(topology)
    ctx = Context(topology, fabrics, Network(topology, fabrics), config,
                  assumptions=assumptions)
    layout = Layout("datacentre", ((("a1:cpu0",), ("b1:cpu0",)),), "a1 -> b1")
    found = estimate(layout, Partition(LAYERS, (0.0, 0.0), 0.0, "test"), ctx, "none")
    return found.iteration_s, found


def by_hand(backward: float = 2.0, loss: float | None = None, hop_extra: float = 0.0,
            compute: float = 1.0, link: float = 1.0) -> float:
    """One microbatch: forward on a1, hop, forward on b1, loss on b1, backward on b1, hop,
    backward on a1."""
    config = model(1).model
    forward = [n * SECONDS_PER_LAYER / compute for n in LAYERS]
    if loss is None:  # the head's FLOPs scaled from the measured layer time
        head = SECONDS_PER_LAYER * costs.head_forward_flops(config) \
            / costs.layer_forward_flops(config)
        loss_s = (1 + backward) * head / compute
    else:
        loss_s = loss * forward[1]
    wire = costs.boundary_activation_bytes(config, 1) / (GBPS * 1e9 / 8 * link)
    hop = LATENCY_MS / 1000 + hop_extra + wire
    return (1 + backward) * sum(forward) + loss_s + 2 * hop


def test_the_default_profile_is_todays_model() -> None:
    assert load_costs("default") == default_costs()
    assert iteration(default_costs())[0] == pytest.approx(by_hand(), rel=1e-12)


@pytest.mark.parametrize(("change", "expected"), [
    ({"backward_ratio": 1.5}, {"backward": 1.5}),
    ({"head_loss": 0.25}, {"loss": 0.25}),
    ({"hop_seconds": 0.35}, {"hop_extra": 0.35}),
    ({"compute_efficiency": 0.5}, {"compute": 0.5}),
    ({"compute_efficiency": {"cpu": 0.5, "b1": 0.9}}, None),
    ({"link_efficiency": 0.25}, {"link": 0.25}),
])
def test_each_assumption_moves_the_estimate_as_it_should(
        change: dict[str, Any], expected: dict[str, Any] | None) -> None:
    seconds, _ = iteration(CostAssumptions.model_validate(change))
    if expected is not None:
        assert seconds == pytest.approx(by_hand(**expected), rel=1e-12)
        assert seconds != pytest.approx(by_hand(), rel=1e-6)
        return
    # a1 at 0.5 by its kind, b1 at 0.9 by its host name (the more specific key wins)
    base = by_hand()
    assert by_hand(compute=0.9) < seconds < by_hand(compute=0.5) and seconds > base


def test_the_skippipe_profile_on_the_hand_computed_case() -> None:
    profile = load_costs("skippipe")
    assert (profile.in_flight, profile.backward_ratio, profile.head_loss,
            profile.hop_seconds) == (3, 1.5, 0.25, 0.35)
    seconds, found = iteration(profile)
    assert seconds == pytest.approx(by_hand(backward=1.5, loss=0.25, hop_extra=0.35),
                                    rel=1e-12)
    assert set(found.in_flight.values()) == {3}


def test_the_in_flight_cap_serialises_or_overlaps_microbatches() -> None:
    one, _ = iteration(CostAssumptions(in_flight=1), microbatches=2)
    assert one == pytest.approx(2 * by_hand(), rel=1e-12)  # a1 waits for mb 0's backward
    auto, _ = iteration(default_costs(), microbatches=2)
    assert auto < one - 1e-6  # 1F1B lets a1 hold 2: mb 1's forward overlaps
    by_memory, _ = iteration(CostAssumptions(in_flight="memory"), microbatches=2)
    assert by_memory <= auto + 1e-12
    _, held3 = iteration(CostAssumptions(in_flight=3), microbatches=2)
    _, held1 = iteration(CostAssumptions(in_flight=1), microbatches=2)
    assert all(held3.memory_gb[d] > held1.memory_gb[d] for d in held1.memory_gb)


def test_profiles_ship_with_the_package() -> None:
    assert {"default", "skippipe"} <= set(list_profiles())


@pytest.mark.parametrize(("costs_yaml", "field", "words"), [
    ({"version": 1, "costs": {"backward_ratio": -1}}, "costs.backward_ratio", "[0, 100]"),
    ({"version": 1, "costs": {"in_flight": "lots"}}, "costs.in_flight", ""),
    ({"version": 1, "costs": {"head_loss": "half"}}, "costs.head_loss", ""),
    ({"version": 1, "costs": {"link_efficiency": 0}}, "costs.link_efficiency", "(0, 10]"),
    ({"version": 1, "costs": {"compute_efficiency": {"gpu": 11}}},
     "costs.compute_efficiency", ""),
    ({"version": 1, "costs": {"hop_secs": 1}}, "costs.hop_secs", "Extra inputs"),
    ({"version": 2, "costs": {}}, "version", "unsupported version 2"),
    ({"version": 1}, "costs", "has no costs: section"),
])
def test_a_bad_costs_file_names_file_and_field(tmp_path: Path, costs_yaml: dict[str, Any],
                                               field: str, words: str) -> None:
    path = tmp_path / "costs.yaml"
    path.write_text(yaml.safe_dump(costs_yaml))
    with pytest.raises(InputError) as caught:
        load_costs(str(path))
    assert caught.value.field.startswith(field) and words in caught.value.message


def lab_files(tmp_path: Path) -> Path:
    from test_planner import lab_topology

    path = tmp_path / "topology.yaml"
    path.write_text(yaml.safe_dump(lab_topology().model_dump(mode="json", exclude_none=True)))
    return path


def run(*argv: str) -> Any:
    return CliRunner().invoke(cli, list(argv), catch_exceptions=True)


def test_the_plan_records_its_assumptions_and_simulate_can_swap_them(tmp_path: Path) -> None:
    topology = lab_files(tmp_path)
    plan = tmp_path / "plan.yaml"
    done = run("plan", str(topology), "-m", "tiny-gpt", "-o", str(plan), "--costs", "skippipe")
    assert done.exit_code == 0, done.output
    recorded = yaml.safe_load(plan.read_text())["costs"]
    assert recorded["name"] == "skippipe" and recorded["hop_seconds"] == 0.35
    assert "Cost assumptions: skippipe" in done.stderr
    own = yaml.safe_load(run("simulate", str(plan), "--json").stdout)
    other = yaml.safe_load(run("simulate", str(plan), "--json", "--costs", "default").stdout)
    assert own["costs"]["name"] == "skippipe" and other["costs"]["name"] == "default"
    assert own["plan"]["iteration_s"] != pytest.approx(other["plan"]["iteration_s"])
    shown = run("show", str(plan), "--costs", "default")
    assert shown.exit_code == 0 and "with default" in shown.stdout


def test_model_yaml_costs_section_is_used_and_overridden(tmp_path: Path) -> None:
    topology = lab_files(tmp_path)
    data = model(2).to_plain()
    data["costs"] = {"name": "mine", "hop_seconds": 1.0}
    (tmp_path / "model.yaml").write_text(yaml.safe_dump(data))
    plan = tmp_path / "plan.yaml"
    done = run("plan", str(topology), "-m", str(tmp_path / "model.yaml"), "-o", str(plan))
    assert done.exit_code == 0, done.output
    assert yaml.safe_load(plan.read_text())["costs"]["name"] == "mine"
    done = run("plan", str(topology), "-m", str(tmp_path / "model.yaml"), "-o", str(plan),
               "--costs", "default")
    assert yaml.safe_load(plan.read_text())["costs"]["name"] == "default"


@pytest.mark.parametrize(("value", "words"), [
    ("nosuch", "error: --costs: no file or cost profile 'nosuch' (profiles: "),
    ("missing/costs.yaml", "missing/costs.yaml: --costs: file not found"),
])
def test_a_bad_costs_option_is_one_line(tmp_path: Path, value: str, words: str) -> None:
    topology = lab_files(tmp_path)
    done = run("plan", str(topology), "-m", "tiny-gpt", "-o", str(tmp_path / "p.yaml"),
               "--costs", value)
    assert done.exit_code == 2 and len(done.stderr.splitlines()) == 1
    assert words in done.stderr and not (tmp_path / "p.yaml").exists()


def test_a_bad_costs_file_on_the_cli_is_one_line(tmp_path: Path) -> None:
    topology = lab_files(tmp_path)
    bad = tmp_path / "c.yaml"
    bad.write_text("version: 1\ncosts:\n  hop_seconds: .inf\n")
    done = run("plan", str(topology), "-m", "tiny-gpt", "-o", str(tmp_path / "p.yaml"),
               "--costs", str(bad))
    assert done.exit_code == 2
    assert done.stderr.startswith(f"error: {bad}: costs.hop_seconds: must be a number in")
