"""The runtime: one rank executing a plan.yaml under torchrun.

It depends on the plan (`holmes.plan`), never the reverse: the planner modules of
`holmes` do not import anything from here. A training script imports only this package:

    from holmes.runtime import PlanRun, Trainer
    run = PlanRun.from_env()            # plan + torchrun env -> groups, stage, schedule
    trainer = Trainer(run, model, make_optimizer, activation_shape=..., total_steps=...)

- `plan_run`: where this process sits in the plan; the plan's process groups; `exit_job`.
- `trainer`: the training loop of one rank (pipeline step, syncs, logs, checkpoints).
- `zero`: a stage's parameters in shards over its data group; ZeRO-1's optimizer state.
- `checkpoints`: the checkpoint folder: step folders of entries by parameter name, the
  manifest of checksums, finding damage, pruning; a path that is not a folder refused.
- `train_state`: a rank's state as those entries (written once, read under any plan);
  the collectives that save a step and resume the newest one every rank has intact.
- `timings`: every rank's per-step record of its tasks, transfers and syncs (JSON lines
  for `hetsched report` and `hetsched calibrate`).
- `links`: which link class (intra_host, intra_site, inter_site) joins two ranks.
- `hf`: Hugging Face causal LMs (Llama, Qwen2/3, Mistral, GPT-2) in the pipeline's model
  contract (imports transformers only when a model is built; not imported here).
- `data`: token streams a user brings (text folders, token files) and the batch of every
  (step, microbatch).
"""

from holmes.runtime.plan_run import Placement, PlanRun, exit_job
from holmes.runtime.trainer import StepLog, Trainer

__all__ = ["Placement", "PlanRun", "StepLog", "Trainer", "exit_job"]
