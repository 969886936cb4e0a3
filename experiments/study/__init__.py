"""The seed study: pretrain once, fine-tune with every method, compare everything.

``python -m experiments.main`` (no flags) runs ``experiments/configs/seed_study.py``
through :func:`experiments.study.runner.run`. The phases, each with a progress bar::

    1. bundled dataset + tokenizer       (built by the first training run)
    2. pretrain (span reconstruction)    <workdir>/pretrain          reused if finished
       + the pretrained-only scores and the trivial baselines
    3. fine-tune, one run per method     <workdir>/methods/<name>    reused if finished
       (and per extra seed of ``seeds``)  <workdir>/methods/<name>-seed<k>
    4. score every method on every task of the test split, keeping each
       example's contribution (the bootstrap's input)
    5. forgetting: the pretraining objective's validation loss before and after
    6. the best model under fp32, bf16, fp16, int8, int4 and NF4
    7. the memory planner against XLA's compiled train step, per method
    8. intervals and paired-bootstrap statements, from the per-example scores
    ─▶ results.json, report.md, plots/*.png   (job logs in <workdir>/logs)

The package, one module per concern:

* ``config``: the study config's algebra: checks it, applies the quick and
  per-method overrides, and derives each phase's run config from the shared
  one and the method's recipe in ``flaxtune.peft.RECIPES``;
* ``phases``: the training phases (reused when finished) and the jobs after
  pretraining, each returning one JSON-able row;
* ``scoring``: what is measured of a trained model (task scores, forgetting,
  step time, precisions, memory);
* ``per_example``: what each test example contributes to a task's score
  (a 0/1 or ROUGE-L value, or BLEU's sufficient statistics);
* ``statements``: the intervals and every claim of the report, each a paired
  bootstrap, computed from ``results.json`` alone;
* ``provenance``: the machine, XLA flags, versions and commit behind a run;
* ``compare``: two runs' statements side by side (do two machines agree?);
* ``pool``: a reusable pool of worker processes that runs jobs side by side,
  a failure staying in its own job;
* ``runner``: the phases in order, the rows gathered into ``results.json``;
* ``report`` and ``plots``: ``report.md`` and the pictures, from the results.

A method that fails does not stop the study: its error is recorded in
``results.json`` and the report, the other methods and precisions go on, and
the run exits non-zero. Nothing fails silently.
"""
