"""Pipelines: compositions of denoisers, samplers and guidance wrappers (never a sampling loop of their own).

- :mod:`difflab.pipelines.cascade`: cascaded diffusion (CDM): a base model and super-resolution stages.
"""
