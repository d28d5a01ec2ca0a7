"""Image transforms: BriVL's training augmentation and the deterministic eval view.

Both end in ImageNet normalisation (the image backbones are ImageNet-pretrained), giving a
float tensor # (3, image_size, image_size).
"""

from __future__ import annotations

from torchvision import transforms as T

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _to_normalized_tensor():
    return [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]


def train_transform(image_size: int, color_augment: bool = True):
    """BriVL's augmentation: mild random resized crop, colour jitter (p=0.8), grayscale (p=0.2).

    No horizontal flip: captions name left and right, and a flip would make them false.
    `color_augment=False` drops jitter and grayscale for data whose captions name colours
    (the demo set), where those would turn true captions into false ones.
    """
    steps = [T.RandomResizedCrop(image_size, scale=(0.8, 1.0), antialias=True)]
    if color_augment:
        steps += [
            T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
            T.RandomGrayscale(p=0.2),
        ]
    return T.Compose(steps + _to_normalized_tensor())


def eval_transform(image_size: int):
    """Resize the short side, centre crop: the same pixels every time."""
    return T.Compose([T.Resize(image_size, antialias=True), T.CenterCrop(image_size)] + _to_normalized_tensor())
