"""Pruning plasticity (Liu et al., NeurIPS 2021, section 3): how well a network recovers from
one-shot pruning, as a function of when in training it is pruned, how much, and whether
connections regenerate.

A study trains one run (the *base*: dense, or sparse with any method) and keeps a checkpoint
at each pruning epoch ``e`` with its test accuracy ``t_pre``. For every epoch x rate x variant
it prunes that checkpoint one-shot by magnitude (:func:`granet.oneshot.prune`), measures
``t_after_prune``, continues training (a *continuation*) and records its final test accuracy
``t_continue``. ``plasticity = t_continue / t_pre``; ``final_gap = t_continue - t_final``, the
base run's final test accuracy.

Variants (:data:`VARIANTS`), each continuing from the same pruned checkpoint:

* ``prune``: the pruned masks stay fixed (static sparse training).
* ``prune+regrow``: GraNet's zero-cost neuroregeneration for the rest of training: every
  ``update_every`` steps each layer drops its ``ceil(r_t * nnz)`` smallest weights and regrows
  as many where the dense gradient is largest (RigL's round at the pruned sparsity), ``r_t``
  following GraNet's cosine decay over the whole schedule (with ``--continue rewind``: over
  the continuation).
* ``prune+regrow-once``: the paper's one-shot regrowth (:func:`granet.oneshot.regrow`): right
  after the prune, each layer regrows as many connections as it lost where the gradient of one
  training batch is largest, at zero; the masks then stay fixed. The network is back at its
  pre-prune density (a dense base: every pruned position comes back, at zero).

Continuations (``continuation``): ``schedule`` trains the rest of the base run's schedule
(epochs ``e + 1`` to the end, at the learning rate the base run had there, its optimizer
state included); ``rewind`` trains ``continue_epochs`` epochs from the pruned weights with a
fresh optimizer and the base schedule laid over those epochs (the learning rate rewound to its
start), the same budget for every pruning epoch.

A continuation is a run of its own: it starts as a checkpoint written into its run folder
(the pruned weights, their masks, the base run's optimizer state) and trains like a run
resumed with ``granet train --resume``, so a study stopped anywhere picks up where it stopped
when the same command runs again, and ``workers`` continuations train at once in their own
processes. With the same settings the study computes the same numbers (the base run's seed
seeds everything).

The package, one job per module (this one names what callers use):

* :mod:`~.settings`: what a study computes (:class:`Study`, :data:`VARIANTS`, :class:`Cell`),
  the base run's config and each continuation's;
* :mod:`~.folder`: the study folder's layout, its marker ``plasticity.json`` and lock;
* :mod:`~.base`: the base run and its prune points;
* :mod:`~.cells`: each cell pruned into its run folder, then trained here or in a pool;
* :mod:`~.results`: the rows of ``plasticity.csv``, the markdown table and the figure;
* :mod:`~.run`: :func:`run_study`, all of the above in order under the folder's lock.
"""

from granet.experiment.plasticity.base import KeepPrunePoints, save_prune_point
from granet.experiment.plasticity.cells import prepare_cell, regrowth_gradients, run_cells
from granet.experiment.plasticity.folder import (
    BASE_DIR,
    CELL_FILE,
    CELLS_DIR,
    CSV_FILE,
    GROWABLE,
    MD_FILE,
    PNG_FILE,
    STUDY_FILE,
    STUDY_KIND,
    STUDY_LOCK,
    open_study,
)
from granet.experiment.plasticity.results import (
    COLUMNS,
    plasticity_markdown,
    plasticity_rows,
    write_results,
)
from granet.experiment.plasticity.run import run_study
from granet.experiment.plasticity.settings import (
    BASE_DEFAULTS,
    CONTINUATIONS,
    DEFAULT_RATES,
    DEFAULT_VARIANTS,
    VARIANTS,
    Cell,
    Study,
    Variant,
    base_config,
    continuation_config,
    default_out,
    every_tenth,
)

__all__ = [
    "BASE_DEFAULTS",
    "BASE_DIR",
    "CELLS_DIR",
    "CELL_FILE",
    "COLUMNS",
    "CONTINUATIONS",
    "CSV_FILE",
    "DEFAULT_RATES",
    "DEFAULT_VARIANTS",
    "GROWABLE",
    "MD_FILE",
    "PNG_FILE",
    "STUDY_FILE",
    "STUDY_KIND",
    "STUDY_LOCK",
    "VARIANTS",
    "Cell",
    "KeepPrunePoints",
    "Study",
    "Variant",
    "base_config",
    "continuation_config",
    "default_out",
    "every_tenth",
    "open_study",
    "plasticity_markdown",
    "plasticity_rows",
    "prepare_cell",
    "regrowth_gradients",
    "run_cells",
    "run_study",
    "save_prune_point",
    "write_results",
]
