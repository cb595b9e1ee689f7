"""A step's updates as plain functions over tensors: the dispatch between the multi-tensor pass and one layer at a
time, one layer's update, the inner rules, the residuals, the lazy Hessian and the compiled update.
"""
