"""Pyro guides (variational families), installed as ``pyro_kpp.guides``."""
