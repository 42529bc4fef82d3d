"""Training: the loop (``loop.py``) and its plumbing: the optimiser (``optim.py``), speed options
(``speed.py``), devices (``device.py``), data-parallel runs (``distributed.py``), checkpoints
(``checkpoint.py``), run folders (``rundir.py``), resuming (``resume.py``) and stop requests
(``interrupts.py``)."""
