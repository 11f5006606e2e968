"""What a step or a product costs on this machine, next to what its arithmetic must cost.

The studies, one CLI command each:

* `overhead`: ``curvlab overhead``, the per-step time of the layer-wise curvature methods
  against SGD-m, next to their floors and their memory;
* `products`: ``curvlab products``, one Hessian- or GGN-vector product against one gradient;
* `smw`: ``curvlab smw-cost``, the per-step time of the chapter-5 methods against SGD-m as the
  network widens.

The floor model behind ``overhead``:

* `operations`: the timing of the operations (matrix products, reductions, solves,
  decompositions: `curvlab.linalg.cost`), each on its own;
* `geometry`: the layer sizes of a forward pass, in which the optimizers give their costs;
* `floor_model`: a floor as a list of timed operations, summed per term;
* `floors`: each method's floor, the operations of its work beyond an SGD-m step as the
  optimizer lists them (`curvlab.optim.base.BlockOptimizer.step_cost`);
* `memory`: the bytes an optimizer keeps, next to the thesis's storage formulas.
"""
