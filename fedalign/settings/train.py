"""The local update's allowed values (``train`` in conf/config.yaml)."""

OPTIMIZERS = ("adam", "sgd")
