"""Invert AlexNet layers with trained decoders (Dosovitskiy & Brox, CVPR 2016, arXiv 1506.02753).

Data flows one way: data -> encoder -> feature_cache -> decoders/training -> metrics/figures/report.
"""
