"""A domain feature extractor for the built-in digits, for `fid_digits`.

Inception-v3 features mean little on 16x16 handwritten digits (and are not available
offline), so the digits get their own FID: a small CNN classifier, trained deterministically
in seconds on the bundled labels of the training split, whose penultimate activations play the
role Inception's 2048-d pool features play in FID (Heusel et al. 2017). It is registered with
torch-fidelity as a custom feature extractor, so torch-fidelity computes the statistics and the
Fréchet distance exactly as for FID. The number is reported as `fid_digits`, never as `fid`:
it is not comparable with Inception FIDs.

The trained classifier is cached in progvae's cache folder (`evaluation.weights.cache_dir`).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from progvae.core.atomic import atomic_save

EXTRACTOR_NAME = "progvae-digits"
FEATURES = "penultimate"          # the 64-d layer FID is computed on
CLASSIFIER_SIZE = 16              # every input is resized to 16x16 grayscale
CLASSIFIER_VERSION = 1            # bump when the architecture or training changes
TRAIN_SEED = 0
TRAIN_EPOCHS = 8
TRAIN_BATCH = 100
TRAIN_LR = 4e-3


class DigitClassifier(nn.Module):
    """Two 3x3 conv layers with max-pooling, a 64-d hidden layer (the features), 10 logits.
    Takes (B, 1, 16, 16) grayscale in [0, 1]."""

    def __init__(self, n_features: int = 64):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.hidden = nn.Linear(32 * 4 * 4, n_features)
        self.out = nn.Linear(n_features, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = F.max_pool2d(F.relu(self.conv1(x)), 2)           # (B, 16, 8, 8)
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)           # (B, 32, 4, 4)
        return F.relu(self.hidden(h.flatten(1)))             # (B, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.features(x))


def to_classifier_input(images_uint8: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) uint8, C in {1, 3} -> (B, 1, 16, 16) float grayscale in [0, 1]."""
    x = images_uint8.float().div(255.0).mean(1, keepdim=True)
    if x.shape[-1] != CLASSIFIER_SIZE or x.shape[-2] != CLASSIFIER_SIZE:
        x = F.interpolate(x, size=(CLASSIFIER_SIZE, CLASSIFIER_SIZE), mode="bilinear",
                          antialias=True, align_corners=False)
    return x


def digits_with_labels() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train images, train labels, test images, test labels) of the built-in digits at 16x16,
    uint8 NHWC, split exactly as `progvae.data.loading.load_data("digits")` splits them."""
    from sklearn.datasets import load_digits

    from progvae.data.loading import DIGITS_TEST_SIZE, SPLIT_SEED, load_data

    data = load_data("digits", CLASSIFIER_SIZE)
    labels = load_digits().target
    order = np.random.default_rng(SPLIT_SEED).permutation(len(labels))
    return (data.train, labels[order[:-DIGITS_TEST_SIZE]],
            data.test, labels[order[-DIGITS_TEST_SIZE:]])


def train_classifier() -> tuple[DigitClassifier, float]:
    """Train the classifier from a fixed seed on the training split; returns it (eval mode) and
    its held-out accuracy. A few seconds on one CPU core."""
    train_x, train_y, test_x, test_y = digits_with_labels()
    as_input = lambda images: to_classifier_input(  # noqa: E731
        torch.from_numpy(images).permute(0, 3, 1, 2))
    x, y = as_input(train_x), torch.from_numpy(train_y).long()
    threads = torch.get_num_threads()
    # One thread: the network is tiny, and on a busy machine more threads only contend.
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(TRAIN_SEED)
            model = DigitClassifier()
            optimizer = torch.optim.Adam(model.parameters(), lr=TRAIN_LR)
            for _ in range(TRAIN_EPOCHS):
                for batch in torch.randperm(len(x)).split(TRAIN_BATCH):
                    loss = F.cross_entropy(model(x[batch]), y[batch])
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
    finally:
        torch.set_num_threads(threads)
    model.eval()
    with torch.no_grad():
        predictions = model(as_input(test_x)).argmax(1).numpy()
    return model, float((predictions == test_y).mean())


def classifier_path():
    """The cached classifier file, trained and written on first use."""
    from progvae.evaluation.metrics.weights import cache_dir

    path = cache_dir() / f"digits_classifier_v{CLASSIFIER_VERSION}.pt"
    if not path.is_file():
        model, accuracy = train_classifier()
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_save({"state_dict": model.state_dict(), "test_accuracy": accuracy}, path)
    return path


def load_classifier(path=None) -> tuple[DigitClassifier, float]:
    state = torch.load(path or classifier_path(), map_location="cpu", weights_only=True)
    model = DigitClassifier()
    model.load_state_dict(state["state_dict"])
    return model.eval().requires_grad_(False), state["test_accuracy"]


def register_with_torch_fidelity() -> str:
    """Register the digit features as a torch-fidelity feature extractor (once per process);
    returns its name, to pass as `feature_extractor=`."""
    import torch_fidelity
    from torch_fidelity.feature_extractor_base import FeatureExtractorBase
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    if EXTRACTOR_NAME in FEATURE_EXTRACTORS_REGISTRY:
        return EXTRACTOR_NAME

    class DigitsFeatureExtractor(FeatureExtractorBase):
        """torch-fidelity's interface around `DigitClassifier`: uint8 (B, 3, H, W) in,
        ("penultimate" (B, 64), "logits" (B, 10)) out, in the order requested."""

        def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
            super().__init__(name, features_list)
            self.classifier, _ = load_classifier(feature_extractor_weights_path)

        def forward(self, x):
            hidden = self.classifier.features(to_classifier_input(x))
            computed = {FEATURES: hidden, "logits": self.classifier.out(hidden)}
            return tuple(computed[name] for name in self.features_list)

        @staticmethod
        def get_provided_features_list():
            return FEATURES, "logits"

        @staticmethod
        def get_default_feature_layer_for_metric(metric):
            return {"isc": "logits", "fid": FEATURES, "kid": FEATURES, "prc": FEATURES}[metric]

        @staticmethod
        def can_be_compiled():
            return False

        @staticmethod
        def get_dummy_input_for_compile():
            return torch.zeros(1, 3, CLASSIFIER_SIZE, CLASSIFIER_SIZE, dtype=torch.uint8)

    torch_fidelity.register_feature_extractor(EXTRACTOR_NAME, DigitsFeatureExtractor)
    return EXTRACTOR_NAME
