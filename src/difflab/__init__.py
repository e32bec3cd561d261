"""difflab: pixel-space diffusion models exact to the papers and the official OpenAI code."""

__version__ = "0.1.0"
