"""An attribute classifier for procedural images, and the offline feature extractor built on it.

`ProceduralClassifier` is a small CNN that reads, off a 64 px procedural image, what the prompt
asked for: the shape (or ``None`` for a word), the colour, the position, the count and the word
(or ``None`` for shapes). Its penultimate layer (`ProceduralClassifier.features`) is the offline
image embedding for the FID-like distance and CMMD (`procedural_extractor`), in the role
Inception-v3 and CLIP play for real images: trained on the domain, with no download.

It is trained on freshly drawn `ProceduralCaptions` images (a seed disjoint from the ones
training and evaluation use), lightly degraded (blur, noise, contrast) so that it judges
imperfect generated images by their content rather than by rendering crispness. The committed
weights live in ``assets/procedural_classifier.safetensors``; retrain with::

    python -m aptp.benchmarks.quality.classifier --steps 1500
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from aptp.errors import ArtifactError, ConfigError
from aptp.train.data import ATTRIBUTE_VALUES, ProceduralCaptions

from .extractors import OfflineFeatureExtractor

logger = logging.getLogger(__name__)

ASSETS = Path(__file__).resolve().parent / "assets"
DEFAULT_WEIGHTS = ASSETS / "procedural_classifier.safetensors"
# Label sets per head; None stands for "not applicable" (no shape in a word image, no word in a shape image).
LABELS: dict[str, tuple] = {
    "shape": tuple(ATTRIBUTE_VALUES["shape"]) + (None,),
    "colour": tuple(ATTRIBUTE_VALUES["colour"]),
    "position": tuple(ATTRIBUTE_VALUES["position"]),
    "count": tuple(ATTRIBUTE_VALUES["count"]),
    "word": tuple(ATTRIBUTE_VALUES["word"]) + (None,),
}
ATTRIBUTES = tuple(LABELS)
# Seeds of the classifier's own training and held-out images: disjoint from the teacher's
# training data (seed 0) and the quality table's prompts (seed 1).
TRAIN_SEED = 7001
HELDOUT_SEED = 7002
FEATURE_DIM = 256


class ProceduralClassifier(nn.Module):
    """Four strided conv stages (64 -> 4 px), a 256-d embedding, one linear head per attribute.

    The embedding keeps the spatial layout (flatten, not global pooling) because position is
    one of the attributes. Inputs are (B, 3, 64, 64) images in [0, 1].
    """

    def __init__(self, width: int = 16, feature_dim: int = FEATURE_DIM, resolution: int = 64):
        super().__init__()
        if resolution % 16:
            raise ConfigError(f"ProceduralClassifier needs a resolution divisible by 16, got {resolution}")
        self.resolution = resolution
        channels = (3, width, 2 * width, 4 * width, 4 * width)
        layers: list[nn.Module] = []
        for cin, cout in zip(channels[:-1], channels[1:]):
            layers += [nn.Conv2d(cin, cout, 3, stride=2, padding=1), nn.GroupNorm(4, cout), nn.SiLU(),
                       nn.Conv2d(cout, cout, 3, padding=1), nn.GroupNorm(4, cout), nn.SiLU()]
        self.body = nn.Sequential(*layers)
        side = resolution // 16
        self.embed = nn.Sequential(nn.Flatten(), nn.Linear(channels[-1] * side * side, feature_dim), nn.SiLU())
        self.heads = nn.ModuleDict({name: nn.Linear(feature_dim, len(labels)) for name, labels in LABELS.items()})

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The (B, feature_dim) embedding of [0, 1] images: the FID/CMMD feature space."""
        return self.embed(self.body(images * 2 - 1))

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits per attribute head."""
        embedding = self.features(images)
        return {name: head(embedding) for name, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 128) -> list[dict[str, Any]]:
        """Per image, the predicted attributes as a dict (`None` where a head says "not applicable")."""
        self.eval()
        out: list[dict[str, Any]] = []
        for chunk in images.split(batch_size):
            logits = self(chunk.float())
            picks = {name: logits[name].argmax(dim=1).tolist() for name in LABELS}
            for i in range(chunk.shape[0]):
                out.append({name: LABELS[name][picks[name][i]] for name in LABELS})
        return out


class _FeatureModule(nn.Module):
    """Exposes `ProceduralClassifier.features` as a module's forward, for `OfflineFeatureExtractor`."""

    def __init__(self, classifier: ProceduralClassifier):
        super().__init__()
        self.classifier = classifier

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier.features(images)


def procedural_extractor(classifier: ProceduralClassifier | None = None, batch_size: int = 128) -> OfflineFeatureExtractor:
    """The offline feature extractor (penultimate layer of the classifier) for FID-like and CMMD."""
    classifier = classifier if classifier is not None else load_classifier()
    return OfflineFeatureExtractor(_FeatureModule(classifier), name="procedural-classifier", dim=FEATURE_DIM,
                                   image_size=classifier.resolution, device="cpu", batch_size=batch_size)


def target_attributes(attributes: dict[str, Any]) -> dict[str, Any]:
    """The classifier's view of `ProceduralCaptions.attributes(i)`: the five heads' labels."""
    return {name: attributes[name] for name in ATTRIBUTES}


def label_indices(records: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Class index tensors per head for a list of attribute dicts."""
    return {name: torch.tensor([LABELS[name].index(r[name]) for r in records]) for name in LABELS}


def render_batch(dataset: ProceduralCaptions, indices: Sequence[int]) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """Images (B, 3, R, R) in [0, 1] and their attribute dicts."""
    images = torch.stack([dataset[i]["pixel_values"] for i in indices]) * 0.5 + 0.5
    return images, [target_attributes(dataset.attributes(i)) for i in indices]


def degrade(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random blur, noise and contrast changes: the ways a generated image falls short of a rendering."""
    batch = images.shape[0]
    blur = torch.rand(batch, generator=generator) < 0.5
    if blur.any():
        kernel = torch.tensor([1.0, 2.0, 1.0])
        kernel = (kernel[:, None] * kernel[None, :]) / 16
        weight = kernel.expand(3, 1, 3, 3).contiguous()
        blurred = F.conv2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), weight, groups=3)
        images = torch.where(blur[:, None, None, None], blurred, images)
    contrast = 0.8 + 0.4 * torch.rand(batch, 1, 1, 1, generator=generator)
    mean = images.mean(dim=(1, 2, 3), keepdim=True)
    images = (images - mean) * contrast + mean
    sigma = 0.06 * torch.rand(batch, 1, 1, 1, generator=generator)
    images = images + sigma * torch.randn(images.shape, generator=generator)
    return images.clamp(0, 1)


def train_classifier(steps: int = 1500, batch_size: int = 64, learning_rate: float = 2e-3, seed: int = 0,
                     num_train: int = 100_000, progress: bool = True) -> ProceduralClassifier:
    """Train a `ProceduralClassifier` from scratch on degraded procedural images (seed `TRAIN_SEED`)."""
    torch.manual_seed(seed)
    model = ProceduralClassifier()
    dataset = ProceduralCaptions(num_train, 64, seed=TRAIN_SEED)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=learning_rate, total_steps=max(1, steps), pct_start=0.1)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    bar = tqdm(range(steps), desc="classifier", disable=not progress)
    for step in bar:
        indices = torch.randint(0, num_train, (batch_size,), generator=generator).tolist()
        images, records = render_batch(dataset, indices)
        logits = model(degrade(images, generator))
        targets = label_indices(records)
        loss = sum(F.cross_entropy(logits[name], targets[name]) for name in LABELS)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
    return model.eval()


@torch.no_grad()
def heldout_accuracy(model: ProceduralClassifier, num_images: int = 1000, seed: int = HELDOUT_SEED,
                     degraded: bool = False) -> dict[str, float]:
    """Per-attribute accuracy (and "all" five right) on real procedural images of a held-out seed."""
    dataset = ProceduralCaptions(num_images, 64, seed=seed)
    images, records = render_batch(dataset, range(num_images))
    if degraded:
        images = degrade(images, torch.Generator().manual_seed(seed))
    predicted = model.predict(images)
    result = {name: sum(p[name] == r[name] for p, r in zip(predicted, records)) / num_images for name in LABELS}
    result["all"] = sum(all(p[n] == r[n] for n in LABELS) for p, r in zip(predicted, records)) / num_images
    return result


def save_classifier(model: ProceduralClassifier, path: str | Path = DEFAULT_WEIGHTS, metadata: dict | None = None) -> Path:
    """Weights as safetensors (metadata: the label sets and anything passed, JSON-encoded)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"labels": json.dumps({k: list(v) for k, v in LABELS.items()}), **{k: json.dumps(v) for k, v in (metadata or {}).items()}}
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path), metadata=meta)
    return path


def load_classifier(path: str | Path = DEFAULT_WEIGHTS) -> ProceduralClassifier:
    """The committed (or given) classifier weights; `ArtifactError` if missing or for other label sets."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"no classifier weights at {path}; train them with `python -m aptp.benchmarks.quality.classifier`")
    with safe_open(str(path), framework="pt") as handle:
        labels = json.loads((handle.metadata() or {}).get("labels", "{}"))
    if labels != {k: list(v) for k, v in LABELS.items()}:
        raise ArtifactError(f"{path} was trained for other attribute labels than aptp.train.data's; retrain it")
    model = ProceduralClassifier()
    model.load_state_dict(load_file(str(path)))
    return model.eval()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Train the procedural attribute classifier / feature extractor.")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--output", type=Path, default=DEFAULT_WEIGHTS)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    model = train_classifier(args.steps, args.batch_size, args.learning_rate)
    clean = heldout_accuracy(model)
    degraded = heldout_accuracy(model, degraded=True)
    report = {"steps": args.steps, "batch_size": args.batch_size, "train_seconds": round(time.perf_counter() - started, 1),
              "heldout_accuracy": clean, "heldout_accuracy_degraded": degraded}
    save_classifier(model, args.output, metadata=report)
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
