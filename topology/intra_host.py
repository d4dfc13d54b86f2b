"""Bandwidth between the GPUs of one host (NVLink or PCIe), by GPU generation.

A host's `intra_host` figure (`topology.schema.IntraHost`) is the bandwidth one GPU has to
the others of its host, both directions together, as vendors publish it (per GPU, in
Gbit/s like every bandwidth of the topology; GB/s x 8). Sources (NVIDIA data sheets):

    V100 SXM2/SXM3 NVLink 2      300 GB/s     A100 SXM4 NVLink 3        600 GB/s
    A800 SXM4 NVLink 3           400 GB/s     H100/H200 SXM NVLink 4    900 GB/s
    B200/GB200 NVLink 5        1,800 GB/s     H800 SXM NVLink 4         400 GB/s
    PCIe-only cards: the PCIe x16 figure of their generation,
    3.0: 32 GB/s (V100 PCIe), 4.0: 64 GB/s (A100 PCIe), 5.0: 128 GB/s (H100 PCIe).

`figure_for_models` derives it from the device model names (`source: assumed`);
`parse_nvidia_smi_topo` reads the link matrix of `nvidia-smi topo -m` (NVLink between the
GPUs or not) so discovery knows whether a card with both options (an A100 PCIe with an
NVLink bridge is still a PCIe card here) really talks over NVLink (`source: reported`).
A figure someone measured (nccl-tests, say) and typed in is `source: measured`. Pure
functions; running `nvidia-smi` is `topology.discover`'s job.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

GB_PER_S_TO_GBPS = 8.0
PCIE_GB_PER_S = {3: 32.0, 4: 64.0, 5: 128.0}
UNKNOWN_PCIE_GENERATION = 3

# (pattern over the lower-cased model name, NVLink GB/s per GPU or None, PCIe generation)
_GENERATIONS: tuple[tuple[str, float | None, int], ...] = (
    (r"gb200|b200|b100", 1800.0, 5),
    (r"h800", 400.0, 5),
    (r"gh200|h200|h100", 900.0, 5),
    (r"a800", 400.0, 4),
    (r"a100", 600.0, 4),
    (r"v100", 300.0, 3),
    (r"l40|l4\b|a10\b|a30|a40|a16|a2\b|rtx|geforce", None, 4),
    (r"t4\b|p100|p40|p4\b", None, 3),
)
_PCIE_WORDS = re.compile(r"pcie|pci-e")
_NVLINK_CELL = re.compile(r"^NV(\d+)$")


@dataclass(frozen=True)
class Figure:
    """A derived intra-host figure: Gbit/s per GPU (both directions) and how it was got."""

    bandwidth_gbps: float
    link: str  # "nvlink" or "pcie"
    detail: str


def figure_for_models(models: Sequence[str | None], nvlink: bool | None = None) -> Figure:
    """The intra-host figure for a host whose GPUs have these model names (the slowest
    GPU's, when they differ). `nvlink` (from nvidia-smi) overrides what the name implies:
    False means PCIe even for an SXM card, True means NVLink."""
    figures = [_one_model(model, nvlink) for model in models] or [_one_model(None, nvlink)]
    return min(figures, key=lambda f: f.bandwidth_gbps)


def _one_model(model: str | None, nvlink: bool | None) -> Figure:
    name = (model or "").lower()
    for pattern, nvlink_gb_s, pcie in _GENERATIONS:
        if re.search(pattern, name):
            pcie_card = bool(_PCIE_WORDS.search(name)) or nvlink_gb_s is None
            use_nvlink = nvlink if nvlink is not None else not pcie_card
            if use_nvlink and nvlink_gb_s is not None:
                return Figure(nvlink_gb_s * GB_PER_S_TO_GBPS, "nvlink",
                              f"{model}: NVLink {nvlink_gb_s:g} GB/s per GPU (vendor figure)")
            return _pcie(pcie, f"{model}: PCIe {pcie}.0 x16")
    return _pcie(UNKNOWN_PCIE_GENERATION,
                 f"model {model or 'unknown'} not in the table: PCIe "
                 f"{UNKNOWN_PCIE_GENERATION}.0 x16 assumed")


def _pcie(generation: int, what: str) -> Figure:
    gb_s = PCIE_GB_PER_S[generation]
    return Figure(gb_s * GB_PER_S_TO_GBPS, "pcie", f"{what}, {gb_s:g} GB/s (PCI-SIG figure)")


def parse_nvidia_smi_topo(text: str) -> bool | None:
    """From `nvidia-smi topo -m`: True when every GPU has an NVLink (`NV<n>`) to another
    GPU, False when the GPU matrix has no NVLink at all, None when there is no GPU
    matrix to read (fewer than two GPUs, or output this parser does not know)."""
    lines = [line.split() for line in text.splitlines() if line.strip()]
    at = next((i for i, cells in enumerate(lines) if cells[0].startswith("GPU")), None)
    if at is None:
        return None
    gpus = [cell for cell in lines[at] if re.fullmatch(r"GPU\d+", cell)]
    rows = [cells for cells in lines[at + 1:] if cells[0] in gpus and len(cells) > len(gpus)]
    if len(gpus) < 2 or len(rows) != len(gpus):
        return None
    linked = [any(_NVLINK_CELL.match(cell) for cell in row[1:len(gpus) + 1]) for row in rows]
    if all(linked):
        return True
    return False if not any(linked) else None
