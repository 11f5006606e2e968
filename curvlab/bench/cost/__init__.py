"""What a step or a product costs on this machine, next to what its arithmetic must cost.

* `overhead`: ``curvlab overhead``, the per-step time of the layer-wise curvature methods
  against SGD-m, next to their floors and their memory;
* `products`: ``curvlab products``, one Hessian- or GGN-vector product against one gradient;
* `smw`: ``curvlab smw-cost``, the per-step time of the chapter-5 methods against SGD-m as the
  network widens;
* `floors`: each method's floor, the operations its work beyond an SGD-m step consists of.
"""
