"""Training entry points (the engine lives in `ich_kaggle.engine`):

- `train_fold(cfg, layout, fold, runs, force)` -> runs/<cfg.name>/fold<k>/ with best.pt, last.pt, log.csv,
  curves.png, train.log, oof.csv, oof_embeddings.npz, config.yaml, done.json. Resumes from last.pt; under
  `torchrun --nproc_per_node=N` it trains with DDP (train.batch_size is the global batch).
- `lr_find(cfg, layout, fold, runs)` -> suggested learning rate, lr_find.csv/png in the fold folder.
- `bench(mini)` -> prints training speed and memory figures (`make bench`).
"""

from __future__ import annotations

from .engine.bench import bench
from .engine.loop import STOP_ENV, train_fold
from .engine.lrfind import lr_find

__all__ = ["train_fold", "lr_find", "bench", "STOP_ENV"]
