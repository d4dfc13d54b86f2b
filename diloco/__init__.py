"""diloco: the DiLoCo / Streaming DiLoCo outer optimizer. Depends on torch only.

DiLoCo (arXiv 2311.08105) lets replicas that are joined by slow links train alone for H
inner steps and then exchange a pseudo-gradient; Streaming DiLoCo (arXiv 2501.18512)
syncs one fragment of the parameters at a time, overlaps the exchange with training and
quantizes what crosses the wire. One module per concept:

- `config`: `DiLoCoConfig`, the validated knobs (the plan's `diloco:` section).
- `fragments`: splitting parameters into fragments by layer (strided or sequential).
- `schedule`: which fragment starts and merges at which inner step.
- `quantize`: the wire formats (fp4 E2M1 with bf16 block scales, int8, bf16, fp32).
- `exchange`: quantized averaging over replicas on a background thread; `ReplicaFailure`.
- `relay`: one exchange per replica when several processes of it hold the same parameters.
- `outer`: pseudo-gradients and the outer Nesterov SGD.
- `accounting`: bytes handed to torch.distributed, per sync event.
- `checkpoint`: atomic checkpoint files.
- `streaming`: `DiLoCo`, which puts them together for one replica.
"""

from diloco.accounting import ByteLedger, CountingComm, LedgerSummary, SyncRecord
from diloco.checkpoint import load_checkpoint, replica_checkpoint_path, save_checkpoint
from diloco.config import DiLoCoConfig
from diloco.exchange import ReplicaFailure, average_across_replicas
from diloco.fragments import Fragment, find_layers, fragments_from_modules, split_fragments
from diloco.outer import OuterSGD, pseudo_gradient
from diloco.quantize import make_codec
from diloco.relay import SiteRelay, relayed_average
from diloco.schedule import SyncSchedule
from diloco.streaming import DiLoCo

__all__ = [
    "ByteLedger",
    "CountingComm",
    "DiLoCo",
    "DiLoCoConfig",
    "Fragment",
    "LedgerSummary",
    "OuterSGD",
    "ReplicaFailure",
    "SiteRelay",
    "SyncRecord",
    "SyncSchedule",
    "average_across_replicas",
    "find_layers",
    "fragments_from_modules",
    "load_checkpoint",
    "make_codec",
    "pseudo_gradient",
    "relayed_average",
    "replica_checkpoint_path",
    "save_checkpoint",
    "split_fragments",
]
