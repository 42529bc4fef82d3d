"""Inference: the bound and its importance-weighted estimate (``bound.py``), the training-only KL
schedules (``schedules.py``), what a memory contributes to a bound (``memory_use.py``) and the
posterior inspection behind the notebooks (``posterior.py``)."""
