"""Data: webdataset streaming of image-caption shards, image transforms, tokenizer loading."""

from wenlan.data.pipeline import DataConfig, make_eval_loader, make_train_loader
from wenlan.data.tokenizer import load_tokenizer
from wenlan.data.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_transform, train_transform

__all__ = [
    "DataConfig",
    "make_train_loader",
    "make_eval_loader",
    "load_tokenizer",
    "train_transform",
    "eval_transform",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
]
