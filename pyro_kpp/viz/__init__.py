"""Figures: image grids of reconstructions and samples (``grids.py``) and training curves
(``curves.py``)."""
