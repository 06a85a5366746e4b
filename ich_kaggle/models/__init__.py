"""Model registry: backbones (smp encoders, pretrainedmodels) + a 6-logit head, with offline weight loading."""
