"""The experiment layer: data, models, training runs, reports and sweeps on top of granet.

Nothing in the library (``granet.*`` outside this package) imports from here.
"""
