"""Reading from a fixed memory: iterative reading, clean-up, interpolation (``iterative.py``)."""
