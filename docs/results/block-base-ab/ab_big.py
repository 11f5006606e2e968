"""Per-step ms of K-BFGS / K-FAC / SGD-m on the thesis autoencoder (batch 1000, float32, 2 threads)."""
import json, sys, time, warnings
import torch
from torch import nn
warnings.filterwarnings("ignore")
torch.set_num_threads(2)
import curvlab.optim as O
from curvlab import Objective
from curvlab.bench.models import autoencoder
names = sys.argv[1].split(",")
METHODS = {
    "kbfgs": lambda m: O.KBFGS(m, lr=0.003),
    "kbfgs-l": lambda m: O.KBFGS(m, lr=0.003, memory=100),
    "kfac": lambda m: O.KFAC(m, lr=0.003),
    "kfac-ef-before": lambda m: O.KFAC(m, lr=0.003, fisher="empirical", statistics="before_step"),
    "shampoo": lambda m: O.Shampoo(m, lr=3e-5, root_method="eigh"),
    "sgd-m": lambda m: torch.optim.SGD(m.parameters(), lr=0.003, momentum=0.9),
}
g = torch.Generator().manual_seed(0)
x = torch.rand(1000, 784, generator=g)
out = {}
for name in names:
    torch.manual_seed(0)
    model = autoencoder([784, 1000, 500, 250, 30, 250, 500, 1000, 784])
    opt = METHODS[name](model)
    loss = nn.BCEWithLogitsLoss(reduction="sum")
    def step():
        opt.step(Objective(model, loss, x, x, batch_average=True))
    for _ in range(5 if name != "kbfgs-l" else 105):
        step()
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(20):
            step()
        best = min(best, (time.perf_counter() - t0) / 20)
    out[name] = best * 1e3
print(json.dumps(out))
