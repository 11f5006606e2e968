"""Per-step time of each block method on a tiny model (framework overhead), threads 1."""
import json, sys, time, warnings
import torch
from torch import nn
warnings.filterwarnings("ignore")
torch.set_num_threads(1)
import curvlab.optim as O
from curvlab import Objective

METHODS = {
    "kfac": lambda m: O.KFAC(m, lr=0.001),
    "kfac-before": lambda m: O.KFAC(m, lr=0.001, statistics="before_step"),
    "kfac-ef-before": lambda m: O.KFAC(m, lr=0.001, statistics="before_step", fisher="empirical"),
    "kbfgs": lambda m: O.KBFGS(m, lr=0.001),
    "kbfgs-l": lambda m: O.KBFGS(m, lr=0.001, memory=10),
    "tnt": lambda m: O.TNT(m, lr=1e-5),
    "shampoo": lambda m: O.Shampoo(m, lr=1e-5, root_method="eigh"),
    "sgd-m": lambda m: torch.optim.SGD(m.parameters(), lr=0.001, momentum=0.9),
}
torch.manual_seed(0)
x = torch.randn(32, 64); y = torch.randint(0, 10, (32,))
out = {}
for name, make in METHODS.items():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10))
    opt = make(model)
    loss = nn.CrossEntropyLoss()
    for _ in range(25):
        opt.step(Objective(model, loss, x, y))
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(40):
            opt.step(Objective(model, loss, x, y))
        best = min(best, (time.perf_counter() - t0) / 40)
    out[name] = best * 1e3
print(json.dumps(out))
