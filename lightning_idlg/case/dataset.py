"""Data sets whose images the attacks try to recover.

Every loader returns a `TrialImages`: a map-style `Dataset` of `(image, label)` pairs, the image a float32
tensor (C, H, W) in [0, 1] (ToTensor only: the paper attacks raw pixels, no mean/std normalization) and the
label a python int, with `num_classes`, `shape` and `name` attached so the victim network can be built
from the data set alone. The loaders are Hydra `_target_`s (configs/dataset/*.yaml).

- `mnist`, `cifar100`, `lfw`: the paper's three data sets, read from the official layouts (and from the
  reduced layouts of ../shared/data: MNIST test files only, CIFAR-100 and LFW as image folders).
- `image_folder`: any `root/<class>/<image>` folder.
- `digits`, `faces`: real images shipped inside scikit-learn / scikit-image, for machines without data.
- `pick_trials`: which image each trial attacks, fixed by a seed.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset, TensorDataset
from torchvision import datasets, transforms

from lightning_idlg.case import safe_pickle
from lightning_idlg.errors import ConfigError

log = logging.getLogger(__name__)

LFW_NAMES = "lfw-names.txt"
CIFAR100_NAMES = "fine_label_names.txt"


class TrialImages(Dataset):
    """A data set plus what the attack needs to know about it: `num_classes`, `shape` (C, H, W), `name`.

    Wraps a dataset of (image tensor, label) and returns (float32 image, int label), checking the shape so a
    stray image of another size fails here with its index instead of deep inside the victim network."""

    def __init__(self, dataset: Dataset, num_classes: int, shape: Sequence[int], name: str):
        self.dataset = dataset
        self.num_classes = int(num_classes)
        self.shape = tuple(int(s) for s in shape)
        self.name = name

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, label = self.dataset[index]
        if tuple(image.shape) != self.shape:
            raise ValueError(f"{self.name} image {index} has shape {tuple(image.shape)}, expected {self.shape}; "
                             f"set dataset.image_size to resize")
        return image.to(torch.float32), int(label)

    def source(self, index: int) -> str:
        """Where image `index` comes from: its file for image folders, else `<name> image <index>`."""
        samples = getattr(self.dataset, "samples", None)
        return str(samples[index][0]) if samples is not None else f"{self.name} image {index}"

    def check(self, indices: Sequence[int]) -> None:
        """Read (decode) each image of `indices` once, so a bad file fails now with its path, not when an
        attack batch picks it, possibly hours into a run."""
        for index in dict.fromkeys(indices):
            try:
                self[index]
            except Exception as err:  # PIL's UnidentifiedImageError, OSError (truncated), our shape check...
                cause = " ".join(str(err).split()) or type(err).__name__
                raise DataError(f"{self.source(index)} cannot be used: {cause}; replace or remove the file "
                                "(every picked image is checked before the first attack)") from None

    def __repr__(self) -> str:
        return f"TrialImages(name={self.name!r}, size={len(self)}, shape={self.shape}, num_classes={self.num_classes})"


class DataError(ConfigError):
    """A data file that cannot be read: one line with the file, what is wrong and how to fix it."""


def missing(what: str, path: str | os.PathLike, looked_for: str, fix: str) -> FileNotFoundError:
    """The one-line error for data that is not where the config says: what, where, which file, how to fix."""
    return FileNotFoundError(f"{what} not found in {path} (looked for {looked_for}); {fix}")


def _read_names(path: str | os.PathLike) -> list[str]:
    """Class names, one per line; only the first tab-separated field counts (lfw-names.txt is 'Name<TAB>count')."""
    with open(path) as f:
        return [line.split("\t")[0].strip() for line in f if line.strip()]


# ---------------------------------------------------------------------------------------------- MNIST

def _mnist_files(train: bool) -> list[str]:
    split = "train" if train else "t10k"
    return [f"{split}-images-idx3-ubyte", f"{split}-labels-idx1-ubyte"]


class _MNISTSplit(datasets.MNIST):
    """torchvision's MNIST, but it only demands the files of the split it reads.

    torchvision's `_check_exists` wants all four raw files, so a folder holding only the test split (as
    ../shared/data/mnist does) is refused. `download()` calls the same check, so download=True still
    fetches all four files when the requested split is missing."""

    @property
    def raw_folder(self) -> str:  # torchvision derives it from the class name; keep the official "MNIST"
        return os.path.join(self.root, "MNIST", "raw")

    @property
    def processed_folder(self) -> str:
        return os.path.join(self.root, "MNIST", "processed")

    def _check_exists(self) -> bool:
        return all(os.path.isfile(os.path.join(self.raw_folder, f)) for f in _mnist_files(self.train))


def mnist(root: str, train: bool = False, download: bool = False) -> TrialImages:
    """MNIST, 1x28x28, 10 classes, read from `root/MNIST/raw/` (uncompressed IDX files, torchvision layout)."""
    raw = Path(root) / "MNIST" / "raw"
    files = _mnist_files(train)
    if not download and not all((raw / f).is_file() for f in files):
        split = "train" if train else "test"
        raise missing(f"MNIST {split} files", raw, " and ".join(files),
                      "set dataset.root=<folder holding MNIST/raw> or dataset.download=true")
    if all((raw / f).is_file() for f in files):
        check_idx(raw / files[0], raw / files[1])
    data = _MNISTSplit(str(root), train=train, download=download, transform=transforms.ToTensor())
    return TrialImages(data, 10, (1, 28, 28), "mnist")


IDX_MAGIC = {2049: (1, "labels"), 2051: (3, "images")}  # unsigned-byte IDX files: dims 1 (labels), 3 (images)


def _idx_count(path: Path, magic: int) -> int:
    """The item count of an uncompressed unsigned-byte IDX file, after checking its header and size."""
    dims, what = IDX_MAGIC[magic]
    fix = "re-download it (dataset.download=true into an empty dataset.root) or unpack the .gz again"
    size = path.stat().st_size
    header = path.read_bytes()[:4 + 4 * dims] if size >= 4 else b""
    found = int.from_bytes(header[:4], "big") if len(header) >= 4 else None
    if found != magic:
        raise DataError(f"{path} is not an MNIST {what} file (IDX magic number {found}, expected {magic}; "
                        f"still gzipped?); {fix}")
    if len(header) < 4 + 4 * dims:
        raise DataError(f"{path} is truncated: {size} bytes, shorter than its {4 + 4 * dims}-byte header; {fix}")
    shape = [int.from_bytes(header[4 + 4 * i:8 + 4 * i], "big") for i in range(dims)]
    expected = 4 + 4 * dims + int(torch.tensor(shape).prod())
    if size != expected:
        raise DataError(f"{path} is {'truncated' if size < expected else 'too long'}: {size} bytes, its header "
                        f"({'x'.join(map(str, shape))} {what}) says {expected}; {fix}")
    return shape[0]


def check_idx(images: Path, labels: Path) -> None:
    """One line naming the file for a truncated, gzipped or mismatched IDX pair (torchvision's reader would
    fail with a bare reshape error)."""
    n_images, n_labels = _idx_count(images, 2051), _idx_count(labels, 2049)
    if n_images != n_labels:
        raise DataError(f"{images} holds {n_images} images but {labels} holds {n_labels} labels; use files of "
                        "the same split")


# ---------------------------------------------------------------------------------------------- CIFAR-100

class _CIFARArrays(Dataset):
    """CIFAR images (N, 32, 32, 3 uint8) and labels as (3x32x32 float tensor in [0, 1], label), as
    torchvision's CIFAR100 with ToTensor gives them (kept as uint8 until asked: 4x less memory)."""

    def __init__(self, images, labels: list[int], classes: list[str]):
        self.images, self.labels, self.classes = images, labels, classes

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return torch.from_numpy(self.images[index]).permute(2, 0, 1).float().div(255), self.labels[index]


CIFAR_FIX = "re-download it (dataset.download=true into an empty dataset.root) or use the image-folder layout"


def _load_cifar_pickle(path: Path) -> dict:
    """A CIFAR pickle read by `safe_pickle` (never the full unpickler: a crafted file would run code)."""
    try:
        content = safe_pickle.load(path)
    except safe_pickle.UnsafePickleError as err:
        raise DataError(f"{path} refused: {err}; {CIFAR_FIX}") from None
    except Exception as err:  # truncated (EOFError), garbage (UnpicklingError, ValueError, ...)
        cause = " ".join(str(err).split()) or type(err).__name__
        raise DataError(f"{path} is not a readable CIFAR-100 pickle ({type(err).__name__}: {cause}; truncated "
                        f"or not a pickle); {CIFAR_FIX}") from None
    if not isinstance(content, dict):
        raise DataError(f"{path} is not a CIFAR-100 pickle (it holds a {type(content).__name__}, not a dict); "
                        f"{CIFAR_FIX}")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in content.items()}


def _read_cifar100(root: Path, split: str) -> _CIFARArrays:
    import numpy as np

    path = root / "cifar-100-python" / split
    content = _load_cifar_pickle(path)
    data, labels = content.get("data"), content.get("fine_labels")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        got = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"{path} has no CIFAR image array (its 'data' must be uint8 N x 3072, got {got}); {CIFAR_FIX}")
    if not isinstance(labels, list) or len(labels) != len(data) or not all(
            isinstance(label, int) and 0 <= label < 100 for label in labels):
        raise DataError(f"{path} has no valid 'fine_labels' (a list of {len(data)} integers in 0..99); {CIFAR_FIX}")
    classes = []  # label names are only decoration (the labels come from the split file)
    meta = root / "cifar-100-python" / "meta"
    if meta.is_file():
        classes = [str(c) for c in _load_cifar_pickle(meta).get("fine_label_names", [])]
    return _CIFARArrays(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels, classes)


def _download_cifar100(root: Path) -> None:
    """torchvision's archive (MD5-checked) unpacked into root, without torchvision's pickle loading."""
    from torchvision.datasets.utils import download_and_extract_archive

    spec = datasets.CIFAR100
    download_and_extract_archive(spec.url, str(root), filename=spec.filename, md5=spec.tgz_md5)


def cifar100(root: str, train: bool = False, download: bool = False) -> TrialImages:
    """CIFAR-100, 3x32x32, 100 fine labels, from either layout under `root`:

    - torchvision's official pickles `root/cifar-100-python/{train,test}` (also what download=true gets);
    - an image folder `root/{train,test}/<fine_label_name>/*.png` (as ../shared/data/cifar100). Labels are
      the official fine-label indices: the order of `root/fine_label_names.txt` if present (so a subset
      missing some classes keeps the official indices), else the folder names sorted alphabetically, which
      is the official order only when all 100 folders are there.
    """
    split = "train" if train else "test"
    pickled = Path(root) / "cifar-100-python" / split
    folder = Path(root) / split
    if pickled.is_file() or (download and not folder.is_dir()):
        if not pickled.is_file():
            _download_cifar100(Path(root))
        return TrialImages(_read_cifar100(Path(root), split), 100, (3, 32, 32), "cifar100")
    if folder.is_dir():
        names_file = Path(root) / CIFAR100_NAMES
        names = _read_names(names_file) if names_file.is_file() else None
        if names is None:
            log.warning("%s not found: CIFAR-100 labels are the sorted folder names of %s, the official "
                        "indices only if all 100 classes are present", names_file, folder)
        data = _folder(folder, names, image_size=None, channels=3)
        return TrialImages(data, 100, (3, 32, 32), "cifar100")
    raise missing(f"CIFAR-100 {split} split", root, f"cifar-100-python/{split} or {split}/<class>/*.png",
                  "set dataset.root=<folder holding cifar-100-python/ or test/> or dataset.download=true")


# ---------------------------------------------------------------------------------------------- image folders

def _load_image(path: str, mode: str) -> Image.Image:
    with open(path, "rb") as f:  # PIL opens lazily; read now so the file is closed right away
        return Image.open(f).convert(mode)


class _NamedFolder(datasets.ImageFolder):
    """torchvision's ImageFolder with a label space fixed by a list of class names (index = position).

    ImageFolder numbers only the sub-folders it finds, so a subset missing some classes would shift every
    label after the gap; here a missing class simply has no images and the others keep their index."""

    def __init__(self, root: str | os.PathLike, class_names: list[str] | None, **kwargs):
        self._names = class_names
        super().__init__(str(root), allow_empty=True, **kwargs)

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        if self._names is None:
            return super().find_classes(directory)
        return list(self._names), {name: i for i, name in enumerate(self._names)}


def _folder(root: str | os.PathLike, class_names: list[str] | None, image_size: int | None,
            channels: int) -> _NamedFolder:
    """`root/<class>/<image>` as (tensor, label); checks that every folder has a label and some image."""
    if not Path(root).is_dir():
        raise missing("image folder", root, "<class>/<image> sub-folders", "set dataset.root=<folder of class folders>")
    if channels not in (1, 3):
        raise ValueError(f"dataset.channels={channels} is not supported; use 1 (gray) or 3 (RGB)")
    if class_names is not None:  # ImageFolder would silently skip a folder whose name has no label
        known = set(class_names)
        unknown = sorted(d.name for d in Path(root).iterdir() if d.is_dir() and d.name not in known)
        if unknown:
            raise ValueError(f"{len(unknown)} folder(s) in {root} are not in the class-name list "
                             f"(first: {unknown[0]}); fix the list or remove the folder(s)")
    steps = [transforms.Resize((image_size, image_size), antialias=True)] if image_size else []
    data = _NamedFolder(root, class_names, loader=functools.partial(_load_image, mode="L" if channels == 1 else "RGB"),
                        transform=transforms.Compose(steps + [transforms.ToTensor()]))
    if len(data) == 0:
        raise missing("images", root, "<class>/*.png|jpg|...", "set dataset.root=<folder of class folders>")
    return data


def image_folder(root: str, class_names: str | None = None, image_size: int | None = None,
                 channels: int = 3) -> TrialImages:
    """Any `root/<class>/<image>` folder. `class_names`: a file with one class name per line that fixes the
    label space (label = line number, num_classes = number of lines); without it the sorted sub-folder names
    are the classes. `image_size`: square resize (None keeps the size, which must then be the same for all
    images). `channels`: 1 (gray) or 3 (RGB)."""
    names = None
    if class_names is not None:
        if not Path(class_names).is_file():
            raise missing("class-name file", Path(class_names).parent, Path(class_names).name,
                          "set dataset.class_names=<file with one class name per line> or null")
        names = _read_names(class_names)
    data = _folder(root, names, image_size, channels)
    shape = tuple(data[0][0].shape)  # the first image fixes (C, H, W); TrialImages checks the others
    return TrialImages(data, len(data.classes), shape, Path(root).name or "image_folder")


def lfw(root: str, names_file: str | None = None, image_size: int = 32, download: bool = False) -> TrialImages:
    """Labeled Faces in the Wild as in the paper: RGB, resized to image_size x image_size, label = the
    person's index in the official list of all 5,749 people (`lfw-names.txt`, lines 'Name<TAB>count').

    Images: `root/<Person_Name>/<Person_Name>_NNNN.jpg`, or `root/lfw-py/lfw/...` where torchvision's
    LFWPeople(download=True, image_set="original") puts them. `names_file` None: `lfw-names.txt` next to the
    person folders, then one folder up (../shared/data keeps it beside `lfw/`); if there is none the label
    space is only the person folders present (a warning says so), which is not the paper's 5,749-way task.
    """
    if download:
        try:
            datasets.LFWPeople(str(root), image_set="original", download=True)
        except ValueError as err:  # torchvision >= 0.20 no longer downloads LFW and says so with a ValueError
            raise RuntimeError(f"torchvision cannot download LFW ({' '.join(str(err).split())}); "
                               f"unpack lfw.tgz so that {root}/<Person_Name>/ exist and set dataset.download=false") from None
    images = Path(root)
    if (images / "lfw-py" / "lfw").is_dir():
        images = images / "lfw-py" / "lfw"
    if not images.is_dir():
        raise missing("LFW images", root, "<Person_Name>/<Person_Name>_NNNN.jpg",
                      "set dataset.root=<folder of person folders> (unpack lfw.tgz there)")
    if names_file is None:
        found = [p for p in (images / LFW_NAMES, images.parent / LFW_NAMES) if p.is_file()]
        names = _read_names(found[0]) if found else None
        if names is None:
            log.warning("%s not found in %s or its parent: LFW labels index the sorted person folders only, "
                        "not the official 5,749 identities", LFW_NAMES, images)
    elif Path(names_file).is_file():
        names = _read_names(names_file)
    else:
        raise missing("LFW name list", Path(names_file).parent, Path(names_file).name,
                      "set dataset.names_file=<path of lfw-names.txt> or null")
    data = _folder(images, names, image_size, channels=3)
    return TrialImages(data, len(data.classes), (3, image_size, image_size), "lfw")


# ---------------------------------------------------------------------------------------------- built-in, offline

def _resize(images: torch.Tensor, image_size: int) -> torch.Tensor:
    """(N, C, h, w) in [0, 1] -> (N, C, image_size, image_size); bilinear weights are convex, the clamp only
    guards against rounding."""
    if images.shape[-1] == image_size and images.shape[-2] == image_size:
        return images
    out = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=True)
    return out.clamp(0.0, 1.0)


def _shipped(name: str, package: str, root, download) -> None:
    """The built-in data sets read no files: a `root` or `download` for them is a mistake, said in one line."""
    if root is not None or download:
        raise ValueError(f"dataset={name} ships with {package} and reads no files, so dataset.root / "
                          "dataset.download do not apply; for files use dataset=mnist, cifar100, lfw or image_folder")


def digits(image_size: int = 28, root: str | None = None, download: bool = False) -> TrialImages:
    """scikit-learn's real handwritten digits (UCI optdigits test set, 1,797 images, 8x8, values 0..16),
    scaled to [0, 1] and resized to 1 x image_size x image_size; 10 classes, the real labels. Shipped with
    scikit-learn, so it needs no download: the default data set on machines without data."""
    _shipped("digits", "scikit-learn", root, download)
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.as_tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.as_tensor(bunch.target, dtype=torch.long)
    data = TensorDataset(_resize(images, image_size).contiguous(), labels)
    return TrialImages(data, 10, (1, image_size, image_size), "digits")


def faces(image_size: int = 32, num_classes: int = 100, root: str | None = None,
          download: bool = False) -> TrialImages:
    """scikit-image's 100 real LFW faces (`skimage.data.lfw_subset()[:100]`, 25x25 gray in [0, 1]),
    repeated to 3 channels and resized to image_size, as the paper feeds LFW to a 3-channel network.

    scikit-image does not ship the identities, so the label is the face's index (0..99): each face is its
    own class. `num_classes` (>= 100) sets the size of the label space, e.g. 5749 to mimic LFW's."""
    _shipped("faces", "scikit-image", root, download)
    from skimage.data import lfw_subset

    if num_classes < 100:
        raise ValueError(f"dataset.num_classes={num_classes} is too small: the 100 faces have labels 0..99")
    images = torch.as_tensor(lfw_subset()[:100], dtype=torch.float32).unsqueeze(1).repeat(1, 3, 1, 1)
    data = TensorDataset(_resize(images, image_size).contiguous(), torch.arange(100))
    return TrialImages(data, num_classes, (3, image_size, image_size), "faces")


# ---------------------------------------------------------------------------------------------- trials

