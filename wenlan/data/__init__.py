"""Data: webdataset streaming of image-caption shards in a world-size-invariant, exactly resumable
order; image transforms; tokenizer loading."""

from wenlan.data.pipeline import (
    DataConfig,
    TrainLoader,
    check_train_layout,
    default_streams,
    make_eval_loader,
    make_train_loader,
    merge_positions,
)
from wenlan.data.shards import expand_shards, missing_local_shards
from wenlan.data.tokenizer import load_tokenizer
from wenlan.data.transforms import (IMAGENET_MEAN, IMAGENET_STD, NORMALISE, TrainTransform, eval_transform, model_images,
                                    train_transform)

__all__ = [
    "DataConfig",
    "TrainLoader",
    "make_train_loader",
    "make_eval_loader",
    "default_streams",
    "check_train_layout",
    "merge_positions",
    "expand_shards",
    "missing_local_shards",
    "load_tokenizer",
    "train_transform",
    "TrainTransform",
    "eval_transform",
    "model_images",
    "NORMALISE",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
]
