"""Which link class joins two ranks of a run: intra_host, intra_site or inter_site.

Hosts come from the plan's device names, sites from the plan's topology file when it can
be read (otherwise every other host counts as inter_site). The trainer counts the bytes
it sends per class with these.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from holmes.review import plan_topology
from holmes.runtime.plan_run import PlanRun
from topology.errors import InputError

CLASS_ORDER = ["intra_host", "intra_site", "inter_site"]  # slowest last


def link_classes(run: PlanRun) -> Callable[[int, int], str]:
    """(torch rank, torch rank) -> its link class."""
    host_of = {rank: device.split(":", 1)[0] for device, rank in run.torch_rank_of.items()}
    site_of = _sites(run)

    def classify(a: int, b: int) -> str:
        ha, hb = host_of[a], host_of[b]
        if ha == hb:
            return "intra_host"
        same = site_of.get(ha) is not None and site_of.get(ha) == site_of.get(hb)
        return "intra_site" if same else "inter_site"

    return classify


def slowest_class(classify: Callable[[int, int], str], ranks: Iterable[int]) -> str:
    """The slowest link class between two of `ranks`."""
    ranks = list(ranks)
    return max((classify(a, b) for a in ranks for b in ranks if a != b),
               key=CLASS_ORDER.index, default="intra_host")


def _sites(run: PlanRun) -> dict[str, str | None]:
    try:
        topology = plan_topology(run.plan, run.plan_path, None)
    except (InputError, OSError):
        return {}
    return {h.name: h.site for h in topology.hosts}
