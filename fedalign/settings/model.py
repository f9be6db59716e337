"""The models a run can train, by name: known without importing torch, so a wrong
``model.name`` is refused in a fraction of a second (``fedalign.models.MODELS`` builds them)."""

MODEL_NAMES = ("digit_cnn", "mlp", "resnet18")
