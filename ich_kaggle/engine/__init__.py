"""The training engine behind `ich_kaggle.train`: distributed set-up, optimisation, the epoch loop, LR finder, bench.

Split by concern so each module stays small: `dist` (ranks, seeds), `optim` (optimizer + per-step schedules),
`plan` (which samples each epoch sees, loaders), `loop` (train_fold), `logs` (log.csv, curves, train.log),
`lrfind` and `bench`.
"""
