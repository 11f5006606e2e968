"""Data-parallel training on torch.distributed; every helper is a no-op in one process.

The one place where curvlab talks to ``torch.distributed`` (the optimizers never import it):

* `Communicator`: bucketed, counted collectives (all-reduce of lists of tensors, broadcasts
  from owner ranks) with clear errors (`DistributedError`) instead of hangs;
* `BlockParallel`: a block-diagonal optimizer's plan — which rank refreshes which block
  (`assign_owners`, greedy longest-processing-time on Σ d³ costs) and how inverses or
  preconditioned gradients reach the other ranks (``mode="inverses"`` / ``"preconditioned"``);
* process groups with timeouts (`init_process_group`, `from_environment` for torchrun),
  `wrap_ddp` (DDP with its gradient bytes counted), `spawn` (N local gloo processes on the
  loopback interface) and `torchrun_command`.

Usage with an optimizer (the layer-wise K-FAC, K-BFGS, TNT, Shampoo, TSO-ALRA, and the
model-wide methods but SMW, which average loss, gradient, curvature products and trial losses
through a `Communicator`; `curvlab.optim.ModelwiseOptimizer.distribute`)::

    comm = curvlab.distributed.from_environment("cpu")[0]      # under torchrun
    opt = KFAC(model, lr=0.3).distribute(comm)                 # plain per-rank model
    loss = opt.step(Objective(model, loss_fn, x_shard, y_shard))
"""

from curvlab.distributed.assignment import assign_owners, kronecker_cost, loads
from curvlab.distributed.comm import (
    DEFAULT_BUCKET_BYTES,
    CommStats,
    Communicator,
    DistributedError,
    plan_buckets,
)
from curvlab.distributed.group import (
    DEFAULT_TIMEOUT_S,
    default_backend,
    destroy_process_group,
    free_port,
    from_environment,
    in_torchrun,
    init_process_group,
    is_ddp,
    wrap_ddp,
)
from curvlab.distributed.launch import spawn, torchrun_command
from curvlab.distributed.parallel import MODES, BlockParallel, Mode, SharedInverse

__all__ = [
    "DEFAULT_BUCKET_BYTES",
    "DEFAULT_TIMEOUT_S",
    "MODES",
    "BlockParallel",
    "CommStats",
    "Communicator",
    "DistributedError",
    "Mode",
    "SharedInverse",
    "assign_owners",
    "default_backend",
    "destroy_process_group",
    "free_port",
    "from_environment",
    "in_torchrun",
    "init_process_group",
    "is_ddp",
    "kronecker_cost",
    "loads",
    "plan_buckets",
    "spawn",
    "torchrun_command",
    "wrap_ddp",
]
