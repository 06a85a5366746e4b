"""A BatchNorm-free test backbone: split batches (accumulation, DDP) then give exactly the full batch's gradients."""

from __future__ import annotations

from torch import nn

from ich_kaggle import models

NAME = "test_nonorm_cnn"

# tiny and fast training overrides shared by the train and predict tests: random init, 32 px, few images, 3 folds
FAST = [
    "model.pretrained=false",
    "data.image_size=32",
    "train.batch_size=8",
    "train.max_images_per_epoch=32",
    "cv.k=3",
    "cv.seed=0",
    "data.num_workers=0",
]


class NoNormCNN(models.Backbone):
    """Two strided convolutions, no normalisation layer."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, 8, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1),
            nn.ReLU(),
        )
        self.out_channels = 16

    def forward(self, x):
        return self.net(x)

    def last_stage(self):
        return [self.net[2]]

    def weight_target(self):
        raise NotImplementedError


models.register(NAME)(NoNormCNN)
