"""The mathematics the models share, free of networks and of Pyro sites: the matrix-normal memory
and its Bayesian write (KM eq. 9-11, ``matrix_normal.py``), spatial-transformer reads of a memory
(K++ §3.2, ``spatial.py``), the discretized logistic mixture (``dmol.py``) and the likelihoods
(``likelihoods.py``)."""
