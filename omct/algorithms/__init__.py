"""Quantization algorithms, each in one module: the statistics it needs (``StatPoint``s) and how it turns them,
with the weights, into fields of the layer records.

Where to add one: a module here with an ``Algorithm`` subclass, and its place in ``pipeline.PIPELINE``.
"""
