"""Launching runs: cluster scripts (SLURM, TPU VM slices) and a sweep over config overrides.

* :mod:`experiments.launch.overrides`: ``key=value`` overrides checked against
  the run config, grids of them, directory names from them;
* :mod:`experiments.launch.scripts`: the SLURM batch script and the TPU VM
  slice command of one run (``python -m experiments.main`` on every process,
  ``jax.distributed`` set up from the environment);
* :mod:`experiments.launch.sweep`: ``python -m experiments.launch.sweep``, a
  grid of overrides run locally one after another or emitted as cluster
  submissions.
"""
