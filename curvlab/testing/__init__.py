"""Helpers of curvlab's tests, importable by any test (test modules import no other test module).

* `curvlab.testing.models`: tiny seeded models and problems.
* `curvlab.testing.conformance`: the conformance suite's checks (run over
  `curvlab.optim.registry` by tests/optim/test_conformance.py).
* `curvlab.testing.spies`, `curvlab.testing.modelwise`: forward-pass counters, operator and
  proposal spies, and the passes-per-step checks of the model-wide methods.
* `curvlab.testing.dense`, `curvlab.testing.autodiff`, `curvlab.testing.solvers`: dense float64
  references (K-FAC factors, curvature products, trust-region and cubic subproblems).
* `curvlab.testing.distributed`: the cases and workers of the two-process gloo tests.

Nothing here imports `curvlab.bench` (tests/test_imports.py).
"""
