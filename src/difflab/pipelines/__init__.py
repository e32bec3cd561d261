"""Pipelines: compositions of denoisers, samplers and guidance wrappers (never a sampling loop of their own).

- :mod:`difflab.pipelines.cascade`: cascaded diffusion (CDM): a base model and super-resolution stages.
- :mod:`difflab.pipelines.inpaint`: ``difflab inpaint``: an image and a mask PNG through the rules of
  :mod:`difflab.inpaint` (GLIDE's, or replacement for any model).
"""
