"""Neural networks: the CPU defaults (``conv.py``), the paper's networks (``paper.py``, K++ App. E)
and the preset's choice between them (``build.py``)."""
