"""lightning_idlg.case.dataset: every loader on real files written here in the official formats (no network, no
../shared), the built-in digits/faces, pick_trials, the one-line missing-data errors, and the dataset configs."""

from __future__ import annotations

import logging
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image

from lightning_idlg.case import dataset as D
from lightning_idlg.case.plan import pick_trials

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "dataset"
RNG = np.random.default_rng(0)


# ------------------------------------------------------------------------------------- writers of official formats

def write_mnist_test(root: Path, n: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """root/MNIST/raw/t10k-{images-idx3,labels-idx1}-ubyte, uncompressed IDX (big-endian header), test only."""
    images = RNG.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = RNG.integers(0, 10, size=n, dtype=np.uint8)
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    (raw / "t10k-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 0x0803, n, 28, 28) + images.tobytes())
    (raw / "t10k-labels-idx1-ubyte").write_bytes(struct.pack(">II", 0x0801, n) + labels.tobytes())
    return images, labels


class _Py2Pickler(pickle._Pickler):
    """Writes bytes as Python 2 `str` (BINSTRING), as the official cifar-100-python files were written: read
    back with encoding='latin1' (torchvision) the keys are 'data', with encoding='bytes' they are b'data'."""

    dispatch = pickle._Pickler.dispatch.copy()

    def _save_py2_str(self, obj: bytes) -> None:
        head = pickle.SHORT_BINSTRING + bytes([len(obj)]) if len(obj) < 256 else pickle.BINSTRING + struct.pack("<i", len(obj))
        self.write(head + obj)
        self.memoize(obj)

    dispatch[bytes] = _save_py2_str


def py2_pickle(obj, path: Path) -> None:
    with open(path, "wb") as f:
        _Py2Pickler(f, protocol=2).dump(obj)


def write_cifar100_pickle(root: Path, n: int = 6) -> tuple[np.ndarray, list[int]]:
    data = RNG.integers(0, 256, size=(n, 3072), dtype=np.uint8)  # rows: 1024 R, 1024 G, 1024 B values
    fine = [0, 99, 42, 7, 99, 3][:n]
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    py2_pickle({b"filenames": [b"x.png"] * n, b"fine_labels": fine, b"coarse_labels": [0] * n, b"data": data},
               folder / "test")
    py2_pickle({b"fine_label_names": [f"class{i}".encode() for i in range(100)],
                b"coarse_label_names": [f"super{i}".encode() for i in range(20)]}, folder / "meta")
    return data, fine


def write_image(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def write_cifar100_folder(root: Path) -> dict[str, np.ndarray]:
    """root/test/<fine_label_name>/*.png for 2 of 5 listed classes, plus root/fine_label_names.txt."""
    (root / "fine_label_names.txt").parent.mkdir(parents=True, exist_ok=True)
    (root / "fine_label_names.txt").write_text("apple\nbee\ncat\ndog\neel\n")
    images = {name: RNG.integers(0, 256, size=(32, 32, 3), dtype=np.uint8) for name in ("bee", "eel")}
    for name, array in images.items():
        write_image(root / "test" / name / "00001.png", array)
    return images


LFW_NAMES = ["AJ_Cook\t1", "Aaron_Eckhart\t1", "Zoe_Ball\t2", "Ben_Affleck\t4", "Yoko_Ono\t1"]


def write_lfw(root: Path) -> None:
    """root/lfw/<Person>/<Person>_NNNN.jpg (250x250 JPEGs, one gray) and root/lfw-names.txt ('Name<TAB>count')."""
    for person, count in (("Zoe_Ball", 2), ("Ben_Affleck", 1)):
        for k in range(1, count + 1):
            write_image(root / "lfw" / person / f"{person}_{k:04d}.jpg", RNG.integers(0, 256, (250, 250, 3), dtype=np.uint8))
    write_image(root / "lfw" / "AJ_Cook" / "AJ_Cook_0001.jpg", RNG.integers(0, 256, (250, 250), dtype=np.uint8))
    (root / "lfw-names.txt").write_text("\n".join(LFW_NAMES) + "\n")


def write_folder(root: Path, size: int = 20) -> None:
    for cls, k in (("cats", 2), ("dogs", 1)):
        for i in range(k):
            write_image(root / cls / f"{i}.png", RNG.integers(0, 256, (size, size, 3), dtype=np.uint8))


# ------------------------------------------------------------------------------------- file loaders

def test_mnist_reads_test_split_without_train_files(tmp_path):
    images, labels = write_mnist_test(tmp_path)
    ds = D.mnist(root=str(tmp_path))
    assert (len(ds), ds.num_classes, ds.shape, ds.name) == (5, 10, (1, 28, 28), "mnist")
    for i in range(5):
        image, label = ds[i]
        assert image.dtype == torch.float32 and image.shape == (1, 28, 28)
        assert 0.0 <= image.min() and image.max() <= 1.0
        torch.testing.assert_close(image[0], torch.from_numpy(images[i]).float() / 255, rtol=0, atol=1e-7)
        assert type(label) is int and label == int(labels[i])


def test_mnist_train_split_missing_is_one_line(tmp_path):
    write_mnist_test(tmp_path)
    with pytest.raises(FileNotFoundError) as err:
        D.mnist(root=str(tmp_path), train=True)
    message = str(err.value)
    assert "\n" not in message and str(tmp_path / "MNIST" / "raw") in message and "train-images-idx3-ubyte" in message


def test_cifar100_official_pickle_read_by_torchvision(tmp_path):
    data, fine = write_cifar100_pickle(tmp_path)
    with open(tmp_path / "cifar-100-python" / "test", "rb") as f:  # the layout the brief describes
        assert set(pickle.load(f, encoding="bytes")) >= {b"data", b"fine_labels"}
    ds = D.cifar100(root=str(tmp_path))
    assert (len(ds), ds.num_classes, ds.shape) == (len(fine), 100, (3, 32, 32))
    assert [ds[i][1] for i in range(len(ds))] == fine
    for i in range(len(ds)):
        expected = torch.from_numpy(data[i].reshape(3, 32, 32)).float() / 255
        torch.testing.assert_close(ds[i][0], expected, rtol=0, atol=1e-7)
    assert ds.dataset.classes[99] == "class99"


def test_cifar100_image_folder_keeps_official_indices(tmp_path):
    images = write_cifar100_folder(tmp_path)
    ds = D.cifar100(root=str(tmp_path))
    assert (len(ds), ds.num_classes, ds.shape) == (2, 100, (3, 32, 32))
    assert [ds[i][1] for i in range(2)] == [1, 4]  # bee, eel: their lines in fine_label_names.txt
    for i, name in enumerate(("bee", "eel")):  # PNG is lossless: exact pixels
        torch.testing.assert_close(ds[i][0], torch.from_numpy(images[name]).permute(2, 0, 1).float() / 255,
                                   rtol=0, atol=1e-7)


def test_lfw_labels_index_the_names_file_in_parent(tmp_path):
    write_lfw(tmp_path)
    ds = D.lfw(root=str(tmp_path / "lfw"))
    assert (len(ds), ds.num_classes, ds.shape, ds.name) == (4, len(LFW_NAMES), (3, 32, 32), "lfw")
    assert sorted(ds[i][1] for i in range(4)) == [0, 2, 2, 3]  # AJ_Cook, Zoe_Ball x2, Ben_Affleck
    for i in range(4):
        image, _ = ds[i]
        assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and 0 <= image.min() <= image.max() <= 1
    gray = next(i for i in range(4) if ds[i][1] == 0)  # the gray JPEG became RGB with equal channels
    assert torch.equal(ds[gray][0][0], ds[gray][0][1])
    explicit = D.lfw(root=str(tmp_path / "lfw"), names_file=str(tmp_path / "lfw-names.txt"), image_size=16)
    assert explicit.shape == (3, 16, 16) and explicit[0][0].shape == (3, 16, 16)


def test_lfw_without_names_falls_back_to_folders(tmp_path, caplog):
    write_lfw(tmp_path)
    (tmp_path / "lfw-names.txt").unlink()
    with caplog.at_level(logging.WARNING, logger="lightning_idlg.case.dataset"):
        ds = D.lfw(root=str(tmp_path / "lfw"))
    assert ds.num_classes == 3 and "lfw-names.txt" in caplog.text
    assert sorted(ds[i][1] for i in range(len(ds))) == [0, 1, 2, 2]  # AJ_Cook, Ben_Affleck, Zoe_Ball


def test_image_folder_with_and_without_class_names(tmp_path):
    write_folder(tmp_path / "imgs")
    plain = D.image_folder(root=str(tmp_path / "imgs"))
    assert (len(plain), plain.num_classes, plain.shape) == (3, 2, (3, 20, 20))
    assert [plain[i][1] for i in range(3)] == [0, 0, 1]
    names = tmp_path / "names.txt"
    names.write_text("birds\ncats\nfish\ndogs\n")
    fixed = D.image_folder(root=str(tmp_path / "imgs"), class_names=str(names), image_size=8, channels=1)
    assert (fixed.num_classes, fixed.shape) == (4, (1, 8, 8))
    assert [fixed[i][1] for i in range(3)] == [1, 1, 3]
    assert fixed[0][0].shape == (1, 8, 8) and 0 <= fixed[0][0].min() <= fixed[0][0].max() <= 1
    names.write_text("cats\n")  # a folder without a label is an error, not silently skipped
    with pytest.raises(ValueError, match="dogs"):
        D.image_folder(root=str(tmp_path / "imgs"), class_names=str(names))


@pytest.mark.parametrize("load, looked_for", [
    (lambda root: D.mnist(root=root), "t10k-images-idx3-ubyte"),
    (lambda root: D.cifar100(root=root), "cifar-100-python/test"),
    (lambda root: D.lfw(root=root), "<Person_Name>"),
    (lambda root: D.image_folder(root=root), "<class>"),
])
def test_missing_root_is_a_one_line_error(tmp_path, load, looked_for):
    root = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError) as err:
        load(str(root))
    message = str(err.value)
    assert "\n" not in message and str(root) in message and looked_for in message


# ------------------------------------------------------------------------------------- built-in data sets

def test_digits_are_sklearns_real_digits():
    from sklearn.datasets import load_digits

    bunch = load_digits()
    ds = D.digits()
    assert (len(ds), ds.num_classes, ds.shape, ds.name) == (1797, 10, (1, 28, 28), "digits")
    image, label = ds[5]
    assert image.shape == (1, 28, 28) and image.dtype == torch.float32 and 0 <= image.min() <= image.max() <= 1
    assert [ds[i][1] for i in range(len(ds))] == bunch.target.tolist()
    native = D.digits(image_size=8)  # no resize: exactly the 0..16 values / 16
    torch.testing.assert_close(native[3][0][0], torch.from_numpy(bunch.images[3]).float() / 16, rtol=0, atol=0)


def test_faces_are_skimages_lfw_subset():
    from skimage.data import lfw_subset

    ds = D.faces()
    assert (len(ds), ds.num_classes, ds.shape, ds.name) == (100, 100, (3, 32, 32), "faces")
    assert [ds[i][1] for i in range(100)] == list(range(100))
    image = ds[7][0]
    assert image.dtype == torch.float32 and 0 <= image.min() <= image.max() <= 1
    assert torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])
    native = D.faces(image_size=25, num_classes=5749)
    assert native.num_classes == 5749
    torch.testing.assert_close(native[7][0][0], torch.from_numpy(lfw_subset()[7]).float(), rtol=0, atol=0)
    with pytest.raises(ValueError):
        D.faces(num_classes=10)


# ------------------------------------------------------------------------------------- trials

def test_pick_trials():
    first = pick_trials(50, 20, seed=3)
    assert first == pick_trials(50, 20, seed=3)  # deterministic
    assert len(first) == 20 and len(set(first)) == 20 and all(0 <= i < 50 for i in first)  # no repeats
    assert first != pick_trials(50, 20, seed=4)
    assert sorted(pick_trials(10, 10, seed=0)) == list(range(10))
    many = pick_trials(5, 40, seed=1)  # more trials than images: with replacement
    assert len(many) == 40 and len(set(many)) < 40 and all(0 <= i < 5 for i in many)
    assert many == pick_trials(5, 40, seed=1) and many != pick_trials(5, 40, seed=2)
    assert pick_trials(5, 0, seed=0) == []


# ------------------------------------------------------------------------------------- configs

def test_every_dataset_config_instantiates(tmp_path, monkeypatch):
    write_mnist_test(tmp_path / "mnist")
    write_cifar100_folder(tmp_path / "cifar100")
    write_lfw(tmp_path)  # tmp/lfw/ with tmp/lfw-names.txt beside it
    write_folder(tmp_path / "images", size=32)
    monkeypatch.setenv("LIGHTNING_IDLG_DATA", str(tmp_path))  # the configs' default root prefix
    expected = {"mnist": (10, (1, 28, 28)), "cifar100": (100, (3, 32, 32)), "lfw": (len(LFW_NAMES), (3, 32, 32)),
                "image_folder": (2, (3, 32, 32)), "digits": (10, (1, 28, 28)), "faces": (100, (3, 32, 32))}
    files = sorted(CONFIGS.glob("*.yaml"))
    assert {f.stem for f in files} == set(expected)
    for file in files:
        cfg = OmegaConf.load(file)
        if "root" in cfg:
            assert cfg.download is False if "download" in cfg else file.stem == "image_folder"
        ds = instantiate(cfg)
        assert (ds.num_classes, ds.shape) == expected[file.stem], file.name
        image, label = ds[0]
        assert image.shape == ds.shape and type(label) is int
