"""Pyro generative programs, installed as ``pyro_kpp.models``."""
