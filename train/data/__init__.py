"""Training data for aptp: captioned image datasets in one sample format, and prompt sets.

Every image dataset yields `{"pixel_values": FloatTensor (3, R, R) in [-1, 1], "text": str}`;
batch them with `collate_captioned`. Build one by name with `load_dataset`::

    dataset = load_dataset("procedural", None, resolution=64, num_samples=1000, seed=0)
    loader = torch.utils.data.DataLoader(dataset, batch_size=8, collate_fn=collate_captioned)

Formats: "jsonl", "cc3m", "coco", "procedural" (see `DATASET_FORMATS`).
"""

from .base import CaptionedImageDataset, collate_captioned
from .formats import DATASET_FORMATS, CC3MCaptions, CocoCaptions, JsonlCaptions, load_dataset
from .procedural import ATTRIBUTE_VALUES, ProceduralCaptions, procedural_prompts
from .prompts import PromptList, load_parti_prompts, load_prompts
from .transforms import image_to_tensor, load_image, resize_center_crop, tensor_to_image

__all__ = [
    "ATTRIBUTE_VALUES",
    "CC3MCaptions",
    "CaptionedImageDataset",
    "CocoCaptions",
    "DATASET_FORMATS",
    "JsonlCaptions",
    "ProceduralCaptions",
    "PromptList",
    "collate_captioned",
    "image_to_tensor",
    "load_dataset",
    "load_image",
    "load_parti_prompts",
    "load_prompts",
    "procedural_prompts",
    "resize_center_crop",
    "tensor_to_image",
]
