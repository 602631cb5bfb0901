"""The paper's experimental protocol as a resumable sweep of finetuning runs, and its report:
`plan` (which runs), `draws` (their tile sets and training draws), `runner` (training and
scoring each run), `report` (tables and figures).

A run is (dataset, arm, training-set size, seed, normalisation). Each one trains through
`demmae_jax.train.finetune.run` in its own workdir (so an interrupted run resumes from its last
checkpoint), is evaluated on the test split with its best validation checkpoint, and writes
`OUT/results/<run id>.json` atomically. A run whose result exists is skipped; nothing written
earlier is replaced. `report` aggregates every result into Markdown tables (mean +- std over
seeds, beside the paper's numbers) and figures in OUT/report.md; a page of docs/ is written only
when asked (`scripts/run_experiments.py --report docs/results.md`).

Data per labelled set (OUT/data/<dataset>/): the tile set of `data_pipelines.prepare` at the
protocol's tile size and stride, and per (size, seed) a manifest whose `train` split is a seeded
draw of that many tiles from the training area, `val` one fixed draw of `val_tiles` tiles for all
runs, and `test` the whole spatially separate test area.
"""
