"""Models with a feature/classifier split, and a registry to build them by name.

Every model exposes ``features(x) -> (N, D)`` and ``classify(f) -> (N, classes)`` so that
feature alignment (MMD on ``features``) and voting (on ``classify``) work on any of them.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from fedalign.errors import FedalignError


class SplitModel(nn.Module):
    """A model made of ``encoder`` (input -> features) and ``head`` (features -> logits)."""

    encoder: nn.Module
    head: nn.Module

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def classify(self, f: torch.Tensor) -> torch.Tensor:
        return self.head(f)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.features(x))


class DigitCNN(SplitModel):
    """The FedKA digit CNN (Sun et al., ACML 2022; official notebook).

    Input 3x28x28 -> 800-d features -> 10 logits.
    """

    feature_dim = 800

    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv2d(in_channels, 64, kernel_size=5),
            nn.BatchNorm2d(64),
            nn.MaxPool2d(2),
            nn.ReLU(),
            nn.Conv2d(64, 50, kernel_size=5),
            nn.BatchNorm2d(50),
            nn.Dropout2d(),
            nn.MaxPool2d(2),
            nn.ReLU(),
            nn.Flatten(),
        )
        self.head = nn.Sequential(
            nn.Linear(self.feature_dim, 100),
            nn.BatchNorm1d(100),
            nn.ReLU(),
            nn.Linear(100, num_classes),
        )


class ResNet18(SplitModel):
    """torchvision's resnet18 (random init, no download) split into features and head."""

    feature_dim = 512

    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        try:
            from torchvision.models import resnet18
        except ImportError as err:
            raise FedalignError(
                "model.name=resnet18 needs torchvision, which is not installed here: "
                "pip install 'fedalign[vision]' (or build the image with TORCHVISION_VERSION)"
            ) from err

        net = resnet18(weights=None, num_classes=num_classes)
        if in_channels != 3:
            net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.head = net.fc
        net.fc = nn.Identity()
        self.encoder = net


class FeatureMLP(SplitModel):
    """An MLP for feature or tabular silos (DeCAF features, bags of words, sensor readings).

    Input D features (``in_channels``: a feature vector's channels) -> 128-d features -> logits.
    BatchNorm in the encoder, as in the digit CNN, so FedBN and target-statistics votes apply.
    """

    feature_dim = 128

    def __init__(self, num_classes: int = 10, in_channels: int = 64, hidden: int = 256) -> None:
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Linear(in_channels, hidden),
            nn.BatchNorm1d(hidden),
            nn.ReLU(),
            nn.Dropout(0.2),
            nn.Linear(hidden, self.feature_dim),
            nn.BatchNorm1d(self.feature_dim),
            nn.ReLU(),
        )
        self.head = nn.Linear(self.feature_dim, num_classes)


MODELS: dict[str, Callable[..., SplitModel]] = {
    "digit_cnn": DigitCNN,
    "resnet18": ResNet18,
    "mlp": FeatureMLP,
}


def build_model(name: str, num_classes: int = 10, in_channels: int = 3) -> SplitModel:
    """Build a registered model by name (see ``MODELS``)."""
    if name not in MODELS:
        known = ", ".join(sorted(MODELS))
        raise ValueError(f"unknown model '{name}' (known: {known}); set model=<one of them>")
    return MODELS[name](num_classes=num_classes, in_channels=in_channels)


def seeded_model(name: str, num_classes: int, in_channels: int, seed: int) -> SplitModel:
    """A registered model whose initial weights depend on ``seed`` alone.

    Parameters
    ----------
    name : str
        The model (see ``MODELS``).
    num_classes : int
        Output classes.
    in_channels : int
        Input channels (an MLP's input features).
    seed : int
        Seeds torch's generator for the initialisation; the caller's random state is left as
        it was.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_model(name, num_classes, in_channels)


def batchnorm_names(model: nn.Module) -> set[str]:
    """Names of every BatchNorm parameter and statistic in ``model``'s state_dict (FedBN)."""
    return {
        f"{module_name}.{key}"
        for module_name, module in model.named_modules()
        if isinstance(module, nn.modules.batchnorm._BatchNorm)
        for key in module.state_dict()
    }


def get_weights(model: nn.Module) -> dict[str, np.ndarray]:
    """The model's transferable state: every floating-point tensor of its state_dict.

    Integer buffers (BatchNorm's ``num_batches_tracked``) are local bookkeeping and are
    neither sent nor averaged.
    """
    return {
        name: tensor.detach().cpu().numpy().copy()
        for name, tensor in model.state_dict().items()
        if tensor.is_floating_point()
    }


def set_weights(model: nn.Module, weights: dict[str, np.ndarray]) -> None:
    """Load ``weights`` (as produced by :func:`get_weights`) into ``model``.

    Raises ``ValueError`` naming the first mismatch when names or shapes differ.
    """
    state = model.state_dict()
    expected = {k for k, v in state.items() if v.is_floating_point()}
    missing, extra = expected - weights.keys(), weights.keys() - expected
    if missing or extra:
        detail = f"missing {sorted(missing)[:3]}" if missing else f"unexpected {sorted(extra)[:3]}"
        raise ValueError(f"weights do not match the model ({detail}); check model= on all sides")
    for name in expected:
        if tuple(state[name].shape) != tuple(weights[name].shape):
            raise ValueError(
                f"weights do not match the model: '{name}' has shape "
                f"{tuple(weights[name].shape)}, model expects {tuple(state[name].shape)}"
            )
        state[name] = torch.as_tensor(weights[name], dtype=state[name].dtype)
    model.load_state_dict(state)
