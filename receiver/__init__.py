"""receiver: verified callbacks and stored results for the FLUX image APIs."""

__version__ = "0.1.0"
# How every call to a provider and every download introduces itself (some CDNs refuse anonymous clients).
USER_AGENT = f"receiver/{__version__}"
