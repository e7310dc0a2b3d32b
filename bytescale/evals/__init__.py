"""Evaluation suites beyond bits per byte: what byte-level and multiscale models are for (docs/evals.md).

Each suite is a deterministic (seeded) task generator plus a scorer:

* ``noise``: bits per byte of held-out continuations when their context is perturbed (case flips, character
  drops, repeats, adjacent swaps), reported as the increase over the clean context (``evals.noise``);
* ``chars``: CUTE-style character tasks on words of the evaluated text (spell, reverse, insert, delete,
  substitute, closest spelling), by greedy exact match and by log-likelihood among distractors (``evals.chars``);
* ``passkey``: a random key hidden at a depth of filler text of length N, retrieved greedily (``evals.passkey``);
* ``induction``: repeated random strings, next-byte accuracy on the second copy (``evals.induction``).

The generators (``tasks``, ``noise``, ``chars``, ``passkey``, ``induction``) are pure Python/numpy (layer 1); the
scorers that run models (``scoring``, ``suites``) speak the model protocol only and sit beside ``generate``
(layer 4). Nothing here is imported by the package on its own.
"""
