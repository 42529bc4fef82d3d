"""Benchmark harness (issue 5): ``python -m pyro_kpp.bench``.

One run measures, for K++, KM, DKM and the VAE with the same encoder and decoder, and writes
``bench.json``, PNG plots and (for missed targets) profiler tables into the output folder:

* ``throughput``: training and evaluation images/s and peak memory at the paper's sizes and at
  the CPU defaults (``sizes``), as ratios to K++;
* ``overhead``: a ``Trace_ELBO`` training step of K++ over the hand-written PyTorch loss of the
  same networks (``reference``);
* ``scaling``: step time against the K++ memory area (fixed window), the KM/DKM slots and the
  episode length T;
* ``flops``: achieved FLOP/s of a K++ step (``FlopCounterMode``) over a float32 matmul peak
  timed in the same process;
* ``quality``: the test bound each model reaches after a fixed training-time budget on Omniglot.

Machines are shared and noisy: contenders are timed in alternation and only ratios of medians
are results (``measure``).
"""
