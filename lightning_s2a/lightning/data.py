"""DataModules whose data need no download: scikit-learn's digits, and users' own folders."""

from __future__ import annotations

import os
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from ..config import S2AConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _check_common(image_size: int, batch_size: int, val_fraction: float, num_workers: int) -> None:
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 8:
        raise ValueError(f"image_size: must be an integer >= 8, got {image_size!r}.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: must be a positive integer, got {batch_size!r}.")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(
            f"val_fraction: must be between 0 and 1 (exclusive), got {val_fraction!r}."
        )
    if num_workers < 0:
        raise ValueError(f"num_workers: must be >= 0, got {num_workers!r}.")


def as_floats(values: Any) -> tuple[float, ...] | None:
    """``values`` as a flat tuple of floats (a list, tuple or 1-D array), else None."""
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        return None
    try:
        return tuple(float(v) for v in values)
    except (TypeError, ValueError):
        return None


def _check_normalization(mean: Any, std: Any) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(mean, std)`` as tuples of three floats, the standard deviations positive."""
    pair = as_floats(mean) or (), as_floats(std) or ()
    if len(pair[0]) != 3 or len(pair[1]) != 3 or min(pair[1]) <= 0:
        raise ValueError(
            f"mean/std: expected three values each (RGB), the std positive; got mean={mean!r}, "
            f"std={std!r} (e.g. --data.mean [0.5,0.5,0.5] --data.std [0.5,0.5,0.5])."
        )
    return pair


def _split(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """A seeded permutation of range(n) cut into (train, val) index lists."""
    n_val = min(max(1, round(n * val_fraction)), n - 1)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return perm[n_val:], perm[:n_val]


#: Folder names of each split (ImageFolderDataModule), matched whatever their case.
TRAIN_FOLDERS = ("train", "training")
VAL_FOLDERS = ("val", "valid", "validation")
TEST_FOLDERS = ("test", "testing")


def _visible_classes(directory: str) -> tuple[list[str], dict[str, int]]:
    """torchvision's ``find_classes`` without hidden folders: ``.ipynb_checkpoints`` with an
    image in it became class 0 and shifted every label (an empty ``.git`` was an error)."""
    classes = sorted(
        e.name for e in os.scandir(directory) if e.is_dir() and not e.name.startswith(".")
    )
    if not classes:
        raise FileNotFoundError(f"Couldn't find any class folder in {directory}.")
    return classes, {name: i for i, name in enumerate(classes)}


def _visible_image(path: str) -> bool:
    """An image file torchvision reads, not hidden (macOS's ``._x.png`` beside ``x.png``
    is no image, and failed mid-epoch)."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

    return not os.path.basename(path).startswith(".") and has_file_allowed_extension(
        path, IMG_EXTENSIONS
    )


def load_rgb(path: str) -> Any:
    """An image as 8-bit RGB. PIL's ``convert("RGB")`` clips 16-bit images to 0-255 (mid
    grey and near black both came out white) and float images to 0 (black): 16-bit ones are
    scaled to 8 bits here, and 32-bit integer or float ones, whose range is unknown, are an
    error that says so."""
    import numpy as np
    from PIL import Image

    with open(path, "rb") as f:
        img = Image.open(f)
        img.load()
    if img.mode.startswith("I;16"):
        wide = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.round(wide / 257.0).astype(np.uint8), mode="L")
    elif img.mode in ("I", "F"):
        raise ValueError(
            f"{path}: a {'32-bit integer' if img.mode == 'I' else 'floating-point'} image "
            f"(PIL mode {img.mode!r}), whose value range ImageFolderDataModule cannot know: "
            "converting it to RGB would clip it. Convert it to 8-bit (or 16-bit) first."
        )
    return img.convert("RGB")


def _image_folder(root: str, transform: Any) -> Any:
    """torchvision's ``ImageFolder`` over ``root`` without hidden folders or files, its
    images read by :func:`load_rgb`."""
    folder = globals().get("VisibleImageFolder") or __getattr__("VisibleImageFolder")
    return folder(root, transform=transform, loader=load_rgb, is_valid_file=_visible_image)


def __getattr__(name: str) -> Any:
    """``VisibleImageFolder``, built on first use (torchvision's import is slow) and
    found here by pickle (workers started by spawn)."""
    if name != "VisibleImageFolder":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from torchvision.datasets import ImageFolder

    class VisibleImageFolder(ImageFolder):
        """``ImageFolder`` whose classes leave hidden folders out."""

        def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
            return _visible_classes(directory)

    VisibleImageFolder.__module__, VisibleImageFolder.__qualname__ = __name__, name
    globals()[name] = VisibleImageFolder
    return VisibleImageFolder


class _LoadersMixin:
    """Train (seeded shuffle), val, and test/predict on a test split where the data has one,
    else on the val split."""

    image_size: int
    batch_size: int
    num_workers: int
    seed: int
    train_set: Dataset | None
    val_set: Dataset | None
    #: A split of its own for test and predict (None: they use the val split).
    test_set: Dataset | None = None

    @property
    def input_size(self) -> tuple[int, int, int]:
        """Shape of one sample, (3, image_size, image_size): what S2A sizes prompts for."""
        return (3, self.image_size, self.image_size)

    def _loader(self, dataset: Dataset | None, train: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}: call setup() before asking for loaders.")
        # Each train epoch's loader draws its workers' seed and then its order from the
        # shuffle generator: kept alive across epochs, workers drew their seed once, and a
        # resumed fit (which starts them anew) drew one more, shifting every later epoch's
        # order (until 2026-12-07 with num_workers > 0).
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=train,
            generator=self._generator if train else None,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0 and not train,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, train=True)

    def state_dict(self) -> dict[str, Any]:
        """The shuffle generator's state, which Lightning saves in checkpoints: a resumed fit
        shuffles its next epoch as the uninterrupted run does (until 2026-12-07 setup seeded
        it anew, and a resumed run replayed epoch 0's order: weights 4.5e-3 apart)."""
        generator = getattr(self, "_generator", None)
        return {} if generator is None else {"shuffle_state": generator.get_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (after ``setup``, as Lightning restores it)."""
        saved = state_dict.get("shuffle_state")
        if saved is None:
            return
        if getattr(self, "_generator", None) is None:
            self._generator = torch.Generator()
        self._generator.set_state(saved)  # in place: a loader built already draws from it

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self._evaluated_set(), train=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self._evaluated_set(), train=False)

    def _evaluated_set(self) -> Dataset | None:
        """What test and predict run on: the test split where there is one, else val."""
        return self.val_set if self.test_set is None else self.test_set


class DigitsDataModule(_LoadersMixin, pl.LightningDataModule):
    """scikit-learn's handwritten digits (1,797 8x8 images, 10 classes), as ImageNet-style input.

    Pixels are scaled to [0, 1], resized bilinearly to ``image_size``, repeated to 3 channels and
    normalised with ``mean`` and ``std`` (ImageNet's by default; ``ImageClassifier`` warns where
    its pretrained weights expect others). The train/val split is a seeded permutation;
    ``test`` and ``predict`` use the val split. The data ship inside scikit-learn (the
    ``datasets`` extra), so nothing downloads.
    """

    num_classes = 10

    def __init__(
        self,
        image_size: int = 64,
        batch_size: int = 32,
        val_fraction: float = 0.2,
        num_workers: int = 0,
        seed: int = 0,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
    ) -> None:
        super().__init__()
        _check_common(image_size, batch_size, val_fraction, num_workers)
        self.mean, self.std = _check_normalization(mean, std)
        self.save_hyperparameters()
        self.image_size = image_size
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.num_workers = num_workers
        self.seed = seed
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None

    def prepare_data(self) -> None:
        _load_digits()  # fail early, with the install hint, if scikit-learn is missing

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        images, targets = _load_digits()
        x = torch.as_tensor(images, dtype=torch.float32).unsqueeze(1) / 16.0
        x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear")
        x = x.clamp_(0.0, 1.0).repeat(1, 3, 1, 1)
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        x = (x - mean) / std
        y = torch.as_tensor(targets, dtype=torch.long)
        train_idx, val_idx = _split(len(y), self.val_fraction, self.seed)
        self.train_set = TensorDataset(x[train_idx], y[train_idx])
        self.val_set = TensorDataset(x[val_idx], y[val_idx])
        self._generator = torch.Generator().manual_seed(self.seed)


def _load_digits() -> tuple[Any, Any]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise ImportError(
            "DigitsDataModule needs scikit-learn, which ships the digits data: install the "
            "'datasets' extra (pip install 'lightning-s2a[datasets]', or uv sync --extra datasets)."
        ) from err
    digits = load_digits()
    return digits.images, digits.target


class ImageFolderDataModule(_LoadersMixin, pl.LightningDataModule):
    """Your own images, one folder per class (torchvision ``ImageFolder``).

    ``root/train`` (or ``training``) and ``root/val`` (or ``valid``, ``validation``), in any
    case, are used if both exist, and ``root/test`` (or ``testing``) for ``test`` and
    ``predict`` if it exists (else the val split); hidden folders and files are left out;
    otherwise ``root``'s class folders are split with a seeded permutation
    (``val_fraction``). Split-named folders without both train and val are an error.
    Train images get a random resized crop and a horizontal flip; val images a resize
    and a center crop; both normalised with ``mean`` and ``std`` (ImageNet's by default).
    """

    def __init__(
        self,
        root: str,
        image_size: int = 224,
        batch_size: int = 32,
        val_fraction: float = 0.2,
        num_workers: int = 2,
        seed: int = 0,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
    ) -> None:
        super().__init__()
        _check_common(image_size, batch_size, val_fraction, num_workers)
        self.mean, self.std = _check_normalization(mean, std)
        root = os.fspath(root)
        if not os.path.isdir(root):
            raise FileNotFoundError(
                f"ImageFolderDataModule: root {root!r} is not a directory; point it at a folder "
                "with one subfolder per class (or with train/ and val/ folders that each have "
                "one subfolder per class)."
            )
        self.save_hyperparameters()
        self.root = root
        self.image_size = image_size
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.num_workers = num_workers
        self.seed = seed
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.classes: list[str] = self._find_classes()

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def _split_folders(self) -> dict[str, str]:
        """``{"train": ..., "val": ..., "test": ...}`` paths of a split layout (``test``
        where there is one), or {} where ``root``'s folders are the classes. Split-named
        folders without a train and a val folder are an error: ``train/`` and ``test/`` were
        taken for two classes, and the model learned which folder an image was in (val
        accuracy 1.0, silently; until 2026-12-07)."""
        present = {
            n.lower(): n for n in os.listdir(self.root) if os.path.isdir(os.path.join(self.root, n))
        }  # Train/ and Val/ were two classes until 2026-12-07
        found = {
            split: next((present[n] for n in names if n in present), None)
            for split, names in (
                ("train", TRAIN_FOLDERS),
                ("val", VAL_FOLDERS),
                ("test", TEST_FOLDERS),
            )
        }
        if found["train"] is not None and found["val"] is not None:
            return {k: os.path.join(self.root, v) for k, v in found.items() if v is not None}
        splits = sorted(v for v in found.values() if v is not None)
        if splits:
            raise ValueError(
                f"ImageFolderDataModule: {self.root!r} holds the split folders {splits} but not "
                f"both a train folder (one of {list(TRAIN_FOLDERS)}) and a validation folder "
                f"(one of {list(VAL_FOLDERS)}), in any case: its "
                "folders would be taken for the classes, and the model would learn which split "
                "an image is in. Add a val/ folder beside train/ (test/ is then used by test "
                "and predict), or point root at a folder with one subfolder per class."
            )
        return {}

    def _find_classes(self) -> list[str]:
        splits = self._split_folders()
        if not splits:
            return _visible_classes(self.root)[0]
        classes = {name: _visible_classes(path)[0] for name, path in splits.items()}
        for name, found in classes.items():
            if found != classes["train"]:
                raise ValueError(
                    f"ImageFolderDataModule: {splits['train']} and {splits[name]} have "
                    f"different class folders ({sorted(set(found) ^ set(classes['train']))} in "
                    "only one)."
                )
        return classes["train"]

    def transforms(self, train: bool) -> Any:
        from torchvision import transforms as T

        normalize = [T.ToTensor(), T.Normalize(self.mean, self.std)]
        if train:
            return T.Compose(
                [
                    T.RandomResizedCrop(self.image_size),
                    T.RandomHorizontalFlip(),
                    *normalize,
                ]
            )
        resize = round(self.image_size / 0.875)  # the usual 224 -> 256 ratio
        return T.Compose([T.Resize(resize), T.CenterCrop(self.image_size), *normalize])

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        train_tf, val_tf = self.transforms(train=True), self.transforms(train=False)
        splits = self._split_folders()
        if splits:
            self.train_set = _image_folder(splits["train"], train_tf)
            self.val_set = _image_folder(splits["val"], val_tf)
            if "test" in splits:
                self.test_set = _image_folder(splits["test"], val_tf)
        else:
            train_view = _image_folder(self.root, train_tf)
            val_view = _image_folder(self.root, val_tf)
            if len(train_view) < 2:
                raise ValueError(
                    f"ImageFolderDataModule: {self.root!r} holds {len(train_view)} image(s); "
                    "at least 2 are needed to split into train and val."
                )
            train_idx, val_idx = _split(len(train_view), self.val_fraction, self.seed)
            self.train_set = Subset(train_view, train_idx)
            self.val_set = Subset(val_view, val_idx)
        self._generator = torch.Generator().manual_seed(self.seed)


def sized_from_data(config: S2AConfig, datamodule: Any) -> S2AConfig:
    """``config`` with the data module's ``input_size`` where prompts or a side network are
    sized and the config gives none, so they fit the resolution the data have; a size that
    is no (C, H, W) of ints is left alone."""
    size = getattr(datamodule, "input_size", None)
    sized = {"prompt", "side"} & set(config.modules)
    if config.input_size is not None or not sized or not isinstance(size, (tuple, list)):
        return config
    if len(size) != 3 or not all(isinstance(v, int) and v > 0 for v in size):
        return config
    return config.replace(input_size=tuple(size))
