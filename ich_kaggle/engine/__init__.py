"""The training engine behind `ich_kaggle.train`: distributed set-up, optimisation, the epoch loop, LR finder.

Split by concern so each module stays small: `dist` (ranks, seeds), `optim` (optimizer + per-step schedules),
`plan` (which samples each epoch sees, loaders), `loop` (train_fold, its set-up shared with `lrfind`), `hooks`
(behaviour called at fixed points of the loop, with its own checkpoint state: `ema`), `logs` (log.csv, train.log),
`figures` (curves.png, the training curves the report shows too), `lrfind`.
"""
