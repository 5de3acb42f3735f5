"""receiver: verified callbacks and stored results for the FLUX image APIs."""

__version__ = "0.1.0"
