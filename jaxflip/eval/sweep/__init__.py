"""``sweep``: a fault campaign, in one process or sharded over several: the perplexity of many
flip settings, each under several seeds, with mean and 95% confidence interval, a table and a plot.

Points. Each ``--grid FIELDS=VALUES`` is one curve: FIELDS (a flip field of the base
``--bitflip-config``, or several joined by ``+`` that take the same value, e.g.
``x_p_exp+x_p_frac``) set to each value in turn, every other setting as the base has it.
VALUES is ``0.5^A:0.5^B`` (every halves from A to B; ``0.5^A:0.5^B:STEP`` every STEP-th) or a
comma list of numbers, ``0.5^K`` and ``none``. A base of regex rules gets the value in every
rule that flips. ``--per-layer linear|block|type`` instead flips one target (a Linear, a
decoder block, or one projection in every block) and one bit group (``--groups``) at a time,
at the base's setting for it: a target x group sensitivity map. The clean model is evaluated
once, for the perplexity ratios.

Seeds. Seed s of a point is the point's config with ``base_seed = s`` (independent per-layer
seeds), so it flips what ``eval ppl`` flips with that config; ``--seeds S`` runs
``--first-seed`` (default: the base's ``base_seed``) and the S - 1 after it.

Cost. The flip settings (``FlipSetting``) and the seeds (``BitflipSeed``) are run-time state of
the model, arguments of the compiled forward; ``runner.prepare_points`` arms every Linear that
any point flips before any runs (``jaxflip.bitflip.arm_for_tables``). The whole sweep, clean
point, every grid point or per-layer cell and every seed, then runs one compiled forward: a
campaign costs one compile and its forwards.

Adaptive seeds (``--ci-width W``): the points run in rounds, 2 seeds each first, then one more
seed per round to each point whose perplexity ratio to clean (the clean perplexity is
deterministic) has a 95% t-interval of full width W or more (upper minus lower end: twice the
table's ``perplexity_ratio_ci95``); ``--seeds`` is then the most a point runs. A point with a
non-finite perplexity under a seed stops there: its interval is undefined. The table's
``seeds`` says how many each point used, ``stopped_by`` why: ``ci-width``, ``seeds`` (ran out),
``nonfinite`` (or ``clean``).

Shards (``--shard K/N``): the process computes the K-th of N shares of the points (point i of
the list, from 0, in share i % N + 1) into the shared ``--output-dir`` and writes no table: one
process per host or GPU, e.g. an array job of tasks 1..N each passing ``--shard $TASK/N``. Every
shard evaluates the clean model too (one forward set, for its ratios); shard 1 writes its file.
Once every shard is done, the same command without ``--shard`` over the same folder merges
their point files into the table and plot, computing only what no shard finished.

Output (``--output-dir``): ``points/`` holds one JSON per point, written whole (aside, then
renamed) as it finishes (with ``--ci-width``: each round it gains seeds); a rerun reuses every
point whose settings match and computes only what is missing (new seeds, new points), so an
interrupted sweep loses at most the point in flight. ``sweep.json`` and ``sweep.csv`` are the table (per point: mean and 95% t-interval of
loss and perplexity over the seeds, the ratio to the clean perplexity), ``sweep.png`` the plot
(perplexity against the grid value per curve, or the heatmap of the per-layer map).
``--sample-prompt`` adds each point's greedy continuation of a prompt (first seed): the
tutorial's check that the text stays coherent.
"""

from jaxflip.eval.sweep.cli import add_arguments, check_arguments, run

__all__ = ["add_arguments", "check_arguments", "run"]
