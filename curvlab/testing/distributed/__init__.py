"""The cases and per-rank workers of the two-process gloo tests (tests/distributed): the only
curvlab module outside `curvlab.distributed` that imports ``torch.nn.parallel`` (DDP)."""
