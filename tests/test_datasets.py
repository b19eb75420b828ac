"""Tests for nferd.data.images (loading) and nferd.data.datasets (layouts), on tiny generated files."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from nferd.data.datasets import (
    DatasetError,
    FolderDataset,
    MVTecDataset,
    VisADataset,
    detect_format,
    discover_categories,
    make_dataset,
)
from nferd.data.images import IMAGE_EXTENSIONS, ImageLoadError, list_images, load_image, load_mask

# --------------------------------------------------------------------------- helpers


def _rgb_array(h: int = 30, w: int = 40, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def _save(array: np.ndarray, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def _save_mask(path: Path, box: tuple[int, int, int, int], h: int = 30, w: int = 40) -> Path:
    """0/255 mask with a rectangle (y0, y1, x0, x1) of defect."""
    m = np.zeros((h, w), dtype=np.uint8)
    y0, y1, x0, x1 = box
    m[y0:y1, x0:x1] = 255
    return _save(m, path)


# --------------------------------------------------------------------------- images


def test_load_rgb_native_size_exact_values(tmp_path: Path) -> None:
    arr = _rgb_array(13, 17)
    t = load_image(_save(arr, tmp_path / "a.png"), None)
    assert t.dtype == torch.float32 and t.shape == (3, 13, 17)
    assert torch.allclose(t, torch.from_numpy(arr).permute(2, 0, 1).float() / 255)


def test_load_grayscale_is_replicated_to_three_channels(tmp_path: Path) -> None:
    arr = np.arange(20 * 10, dtype=np.uint8).reshape(20, 10)
    t = load_image(_save(arr, tmp_path / "g.png"), None)
    assert t.shape == (3, 20, 10)
    assert torch.equal(t[0], t[1]) and torch.equal(t[1], t[2])
    assert torch.allclose(t[0], torch.from_numpy(arr).float() / 255)


def test_load_rgba_drops_alpha(tmp_path: Path) -> None:
    rgba = np.concatenate([_rgb_array(8, 9), np.zeros((8, 9, 1), np.uint8)], axis=2)
    t = load_image(_save(rgba, tmp_path / "a.png"), None)
    # Alpha is dropped, not composited: colours under fully transparent pixels survive.
    assert torch.allclose(t, torch.from_numpy(rgba[..., :3]).permute(2, 0, 1).float() / 255)
    la = Image.fromarray(np.full((5, 6), 200, np.uint8)).convert("LA")
    la.save(tmp_path / "la.png")
    assert torch.allclose(load_image(tmp_path / "la.png"), torch.full((3, 5, 6), 200 / 255))


def test_load_palette_with_and_without_transparency(tmp_path: Path) -> None:
    img = Image.new("P", (6, 4))
    img.putpalette([0, 0, 0, 255, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 9))
    img.putdata([1] * 12 + [2] * 12)
    img.save(tmp_path / "p.png")
    img.save(tmp_path / "pt.png", transparency=0)
    for name in ("p.png", "pt.png"):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            t = load_image(tmp_path / name, None)
        assert t.shape == (3, 4, 6)
        assert torch.equal(t[:, 0, 0], torch.tensor([1.0, 0.0, 0.0]))
        assert torch.equal(t[:, 3, 5], torch.tensor([0.0, 0.0, 1.0]))


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_load_16bit_scaled_by_65535(tmp_path: Path, suffix: str) -> None:
    arr = np.array([[0, 32768, 65535], [65535, 0, 32768]], dtype=np.uint16)
    path = tmp_path / f"deep{suffix}"
    Image.fromarray(arr).save(path)
    with Image.open(path) as im:
        assert im.mode in ("I;16", "I;16B", "I;16L", "I")
    t = load_image(path, None)
    assert t.shape == (3, 2, 3)
    assert t[0, 0, 2].item() == pytest.approx(1.0)
    assert t[0, 0, 1].item() == pytest.approx(0.5, abs=1e-4)
    assert t[0, 0, 0].item() == 0.0
    assert torch.equal(t[0], t[2])


def test_load_16bit_big_endian_and_mode_i(tmp_path: Path) -> None:
    big = Image.fromarray(np.full((4, 5), 65535, dtype=">u2"))
    assert big.mode == "I;16B"
    big.save(tmp_path / "be.tif")
    Image.fromarray(np.full((4, 5), 32768, dtype=np.int32)).save(tmp_path / "i.tif")
    with Image.open(tmp_path / "i.tif") as im:
        assert im.mode == "I"
    assert torch.allclose(load_image(tmp_path / "be.tif"), torch.ones(3, 4, 5))
    assert torch.allclose(load_image(tmp_path / "i.tif"), torch.full((3, 4, 5), 32768 / 65535))


def test_load_16bit_resize_keeps_precision(tmp_path: Path) -> None:
    Image.fromarray(np.full((37, 53), 1000, dtype=np.uint16)).save(tmp_path / "d.png")
    t = load_image(tmp_path / "d.png", 64)
    assert t.shape == (3, 64, 64)
    assert torch.allclose(t, torch.full_like(t, 1000 / 65535), atol=1e-6)  # 8-bit would round


def test_load_cmyk(tmp_path: Path) -> None:
    Image.fromarray(_rgb_array(20, 24)).convert("CMYK").save(tmp_path / "c.jpg")
    t = load_image(tmp_path / "c.jpg", 64)
    assert t.shape == (3, 64, 64) and 0.0 <= t.min() and t.max() <= 1.0


@pytest.mark.parametrize("hw", [(37, 53), (1, 200), (300, 7), (64, 64)])
def test_odd_sizes_resized(tmp_path: Path, hw: tuple[int, int]) -> None:
    path = _save(_rgb_array(*hw), tmp_path / "odd.png")
    assert load_image(path, 64).shape == (3, 64, 64)
    assert load_image(path, (32, 48)).shape == (3, 32, 48)  # tuple is (height, width)


def test_resize_is_pillow_bilinear(tmp_path: Path) -> None:
    arr = _rgb_array(50, 70)
    path = _save(arr, tmp_path / "r.png")
    expected = Image.fromarray(arr).resize((64, 64), Image.Resampling.BILINEAR, reducing_gap=None)
    expected_t = torch.from_numpy(np.array(expected)).permute(2, 0, 1).float() / 255
    assert torch.equal(load_image(path, 64), expected_t)


def test_truncated_png_raises_with_file_name(tmp_path: Path) -> None:
    good = _save(_rgb_array(64, 64), tmp_path / "whole.png")
    data = good.read_bytes()
    bad = tmp_path / "broken_file.png"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageLoadError, match="broken_file.png"):
        load_image(bad, 32)
    with pytest.raises(ImageLoadError, match="broken_file.png"):
        load_mask(bad, 32)


def test_text_file_and_missing_file_raise(tmp_path: Path) -> None:
    fake = tmp_path / "notes_really.png"
    fake.write_text("this is not an image\n")
    with pytest.raises(ImageLoadError, match="notes_really.png") as info:
        load_image(fake, 32)
    assert "valid PNG" in str(info.value)
    assert isinstance(info.value, ValueError)
    with pytest.raises(ImageLoadError, match="does not exist"):
        load_image(tmp_path / "nowhere.png", 32)


def test_load_mask_binary_any_nonzero(tmp_path: Path) -> None:
    m = np.zeros((30, 40), np.uint8)
    m[5:10, 5:20] = 1  # nonzero but dark: still defect
    m[20:25, 30:35] = 255
    t = load_mask(_save(m, tmp_path / "m.png"), None)
    assert t.shape == (1, 30, 40) and t.dtype == torch.float32
    assert set(t.unique().tolist()) == {0.0, 1.0}
    assert t.sum().item() == 5 * 15 + 5 * 5
    r = load_mask(tmp_path / "m.png", 64)
    assert r.shape == (1, 64, 64) and set(r.unique().tolist()) == {0.0, 1.0}


def test_load_mask_resize_bilinear_then_threshold(tmp_path: Path) -> None:
    m = np.zeros((100, 100), np.uint8)
    m[40:60, 40:60] = 255
    path = _save(m, tmp_path / "m.png")
    ref = Image.fromarray(m).resize((37, 37), Image.Resampling.BILINEAR, reducing_gap=None)
    expected = torch.from_numpy((np.asarray(ref) / 255.0 >= 0.5).astype(np.float32))[None]
    assert torch.equal(load_mask(path, 37), expected)


def test_load_mask_16bit_and_rgb(tmp_path: Path) -> None:
    m16 = np.zeros((10, 10), np.uint16)
    m16[2:4, 2:4] = 1  # 1 out of 65535: still a defect
    Image.fromarray(m16).save(tmp_path / "m16.png")
    assert load_mask(tmp_path / "m16.png").sum().item() == 4
    rgb = np.zeros((10, 10, 3), np.uint8)
    rgb[0, 0, 2] = 9
    assert load_mask(_save(rgb, tmp_path / "rgb.png")).sum().item() == 1


def test_list_images(tmp_path: Path) -> None:
    for name in ("b.png", "a.JPG", "c.tiff", ".hidden.png", "notes.txt", "d.webp"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "e.png").write_bytes(b"x")
    assert [p.name for p in list_images(tmp_path)] == ["a.JPG", "b.png", "c.tiff", "d.webp"]
    assert set(IMAGE_EXTENSIONS) >= {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}
    with pytest.raises(NotADirectoryError, match="missing_dir"):
        list_images(tmp_path / "missing_dir")


# --------------------------------------------------------------------------- MVTec


@pytest.fixture()
def mvtec_root(tmp_path: Path) -> Path:
    """cat_a: 3 train, 2 test good, 2 scratch, 1 hole; cat_b: train only; plus noise folders."""
    root = tmp_path / "mvtec"
    a = root / "cat_a"
    for i in range(3):
        _save(_rgb_array(seed=i), a / "train" / "good" / f"{i:03d}.png")
    for i in range(2):
        _save(_rgb_array(seed=10 + i), a / "test" / "good" / f"{i:03d}.png")
        _save(_rgb_array(seed=20 + i), a / "test" / "scratch" / f"{i:03d}.png")
        _save_mask(a / "ground_truth" / "scratch" / f"{i:03d}_mask.png", (0, 15, 0, 20))
    _save(_rgb_array(seed=30), a / "test" / "hole" / "000.png")
    _save_mask(a / "ground_truth" / "hole" / "000_mask.png", (15, 30, 20, 40))
    _save(_rgb_array(seed=40), root / "cat_b" / "train" / "good" / "000.png")
    (root / "not_a_category").mkdir()
    (root / "license.txt").write_text("x")
    return root


def test_mvtec_train(mvtec_root: Path) -> None:
    ds = MVTecDataset(mvtec_root, "cat_a", "train", image_size=32)
    assert len(ds) == 3 and ds.labels == [0, 0, 0] and ds.has_masks
    item = ds[1]
    assert set(item) == {"image", "mask", "label", "path", "defect_type", "index"}
    assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.float32
    assert 0.0 <= item["image"].min() and item["image"].max() <= 1.0
    assert item["mask"].shape == (1, 32, 32) and item["mask"].sum() == 0
    assert item["label"] == 0 and item["defect_type"] == "good" and item["index"] == 1
    assert item["path"].endswith("001.png") and isinstance(item["path"], str)
    assert ds[-1]["index"] == 2
    with pytest.raises(IndexError):
        ds[3]


def test_mvtec_test_split_labels_types_masks(mvtec_root: Path) -> None:
    ds = MVTecDataset(mvtec_root, "cat_a", "test", image_size=32)
    assert len(ds) == 5 and ds.has_masks
    assert ds.labels == [0, 0, 1, 1, 1]  # good first, then defect types by name
    assert ds.defect_types == ["good", "good", "hole", "scratch", "scratch"]
    for i in range(len(ds)):
        item = ds[i]
        mask = item["mask"]
        assert set(mask.unique().tolist()) <= {0.0, 1.0}
        assert (mask.sum() > 0) == (item["label"] == 1)
    hole = ds[2]["mask"][0]
    assert hole[24:, 20:].all() and hole[:14].sum() == 0  # bottom-right region, resized
    scratch = ds[3]["mask"][0]
    assert scratch[:15, :15].all() and scratch[17:].sum() == 0


def test_mvtec_batches_with_default_collate(mvtec_root: Path) -> None:
    ds = MVTecDataset(mvtec_root, "cat_a", "test", image_size=32)
    batch = next(iter(DataLoader(ds, batch_size=4)))
    assert batch["image"].shape == (4, 3, 32, 32) and batch["mask"].shape == (4, 1, 32, 32)
    assert batch["label"].tolist() == [0, 0, 1, 1] and len(batch["path"]) == 4
    assert batch["defect_type"] == ["good", "good", "hole", "scratch"]


def test_mvtec_partly_masked_split_is_refused_with_the_missing_masks(mvtec_root: Path) -> None:
    (mvtec_root / "cat_a" / "ground_truth" / "scratch" / "001_mask.png").unlink()
    with pytest.raises(DatasetError, match=r"scratch[/\\]001\.png") as info:
        MVTecDataset(mvtec_root, "cat_a", "test")
    msg = str(info.value)
    assert "1 of 3 anomalous images" in msg and "_mask" in msg and "`image_metrics_only`" in msg
    assert "000.png" not in msg  # only the image without a mask is listed
    ds = MVTecDataset(mvtec_root, "cat_a", "test", image_metrics_only=True)  # masks ignored, labels kept
    assert not ds.has_masks and ds.labels == [0, 0, 1, 1, 1] and "image metrics only" in ds.no_masks_reason
    assert all(ds[i]["mask"].sum() == 0 for i in range(len(ds)))


def test_mvtec_split_without_ground_truth_is_labels_only(mvtec_root: Path) -> None:
    import shutil
    shutil.rmtree(mvtec_root / "cat_a" / "ground_truth")
    ds = MVTecDataset(mvtec_root, "cat_a", "test")
    assert not ds.has_masks and ds.labels == [0, 0, 1, 1, 1]
    assert "3 anomalous images have image labels but no ground-truth masks" in ds.no_masks_reason


def test_folder_ok_nok_without_masks_is_labels_only_and_partial_masks_are_refused(tmp_path: Path) -> None:
    ok, nok, masks = tmp_path / "ok", tmp_path / "nok", tmp_path / "masks"
    for i in range(2):
        _save(np.full((30, 40, 3), 90, np.uint8), ok / f"{i}.png")
        _save(np.full((30, 40, 3), 200, np.uint8), nok / f"{i}.png")
    ds = FolderDataset(None, "test", 32, test_normal_dir=ok, test_abnormal_dir=nok)
    assert not ds.has_masks and ds.labels == [0, 0, 1, 1] and "no mask folder given" in ds.no_masks_reason
    _save_mask(masks / "0.png", (0, 10, 0, 10))
    with pytest.raises(DatasetError, match=r"1 of 2 anomalous images[\s\S]*nok[/\\]1\.png"):
        FolderDataset(None, "test", 32, test_normal_dir=ok, test_abnormal_dir=nok, mask_dir=masks)
    _save_mask(masks / "1_mask.png", (0, 10, 0, 10))
    assert FolderDataset(None, "test", 32, test_normal_dir=ok, test_abnormal_dir=nok, mask_dir=masks).has_masks


def test_mvtec_missing_category_lists_available(mvtec_root: Path) -> None:
    with pytest.raises(DatasetError) as info:
        MVTecDataset(mvtec_root, "bottle", "train")
    msg = str(info.value)
    assert "bottle" in msg and "cat_a, cat_b" in msg and "train/good" in msg
    assert "not_a_category" not in msg
    with pytest.raises(DatasetError, match="does not exist"):
        MVTecDataset(mvtec_root / "nope", "cat_a", "train")


def test_mvtec_empty_train_folder(mvtec_root: Path) -> None:
    (mvtec_root / "empty" / "train" / "good").mkdir(parents=True)
    with pytest.raises(DatasetError, match=r"no images found in .*good.*\.png"):
        MVTecDataset(mvtec_root, "empty", "train")


def test_mvtec_missing_split_folders(mvtec_root: Path) -> None:
    with pytest.raises(DatasetError, match="test"):
        MVTecDataset(mvtec_root, "cat_b", "test")
    with pytest.raises(DatasetError, match="validation"):
        MVTecDataset(mvtec_root, "cat_a", "validation")
    with pytest.raises(DatasetError, match="split must be"):
        MVTecDataset(mvtec_root, "cat_a", "val")


def test_mvtec_mask_named_like_image(mvtec_root: Path) -> None:
    gt = mvtec_root / "cat_a" / "ground_truth" / "hole"
    (gt / "000_mask.png").rename(gt / "000.png")
    ds = MVTecDataset(mvtec_root, "cat_a", "test", image_size=32)
    assert ds[2]["defect_type"] == "hole" and ds[2]["mask"].sum() > 0


def test_mvtec3d_rgb_and_gt_subfolders(tmp_path: Path) -> None:
    cat = tmp_path / "mv3d" / "bagel"
    for split in ("train", "validation"):
        for i in range(2):
            _save(_rgb_array(seed=i), cat / split / "good" / "rgb" / f"{i:03d}.png")
    _save(_rgb_array(seed=5), cat / "test" / "good" / "rgb" / "000.png")
    _save_mask(cat / "test" / "good" / "gt" / "000.png", (0, 0, 0, 0))
    _save(_rgb_array(seed=6), cat / "test" / "crack" / "rgb" / "000.png")
    _save_mask(cat / "test" / "crack" / "gt" / "000.png", (0, 30, 0, 10))
    (cat / "test" / "crack" / "xyz").mkdir()
    assert len(MVTecDataset(tmp_path / "mv3d", "bagel", "train", 32)) == 2
    assert len(MVTecDataset(tmp_path / "mv3d", "bagel", "validation", 32)) == 2
    ds = MVTecDataset(tmp_path / "mv3d", "bagel", "test", image_size=32)
    assert ds.labels == [0, 1] and ds.defect_types == ["good", "crack"]
    mask = ds[1]["mask"][0]
    assert mask[:, :7].all() and mask[:, 9:].sum() == 0
    assert ds[1]["path"].endswith(str(Path("crack") / "rgb" / "000.png"))


def test_loco_folder_masks_are_unioned(tmp_path: Path) -> None:
    cat = tmp_path / "loco" / "juice"
    _save(_rgb_array(), cat / "train" / "good" / "000.png")
    _save(_rgb_array(seed=1), cat / "test" / "logical_anomalies" / "000.png")
    _save(_rgb_array(seed=2), cat / "test" / "structural_anomalies" / "000.png")
    gt = cat / "ground_truth"
    _save_mask(gt / "logical_anomalies" / "000" / "000.png", (0, 10, 0, 10))
    _save_mask(gt / "logical_anomalies" / "000" / "001.png", (20, 30, 30, 40))
    _save_mask(gt / "structural_anomalies" / "000" / "000.png", (5, 15, 5, 15))
    ds = MVTecDataset(tmp_path / "loco", "juice", "test", image_size=None)
    assert ds.defect_types == ["logical_anomalies", "structural_anomalies"]
    mask = ds[0]["mask"][0]
    assert mask.shape == (30, 40)
    assert mask.sum().item() == 100 + 100  # both files
    assert mask[:10, :10].all() and mask[20:, 30:].all()


# --------------------------------------------------------------------------- VisA


@pytest.fixture()
def visa_root(tmp_path: Path) -> Path:
    root = tmp_path / "visa"
    rows = ["object,split,label,image,mask"]
    for i in range(3):
        rel = f"candle/Data/Images/Normal/{i:03d}.JPG"
        Image.fromarray(_rgb_array(seed=i)).save(_mk(root / rel), "JPEG")
        rows.append(f"candle,train,normal,{rel},")
    rel = "candle/Data/Images/Normal/100.JPG"
    Image.fromarray(_rgb_array(seed=9)).save(_mk(root / rel), "JPEG")
    rows.append(f"candle,test,normal,{rel},")
    for i in range(2):
        rel = f"candle/Data/Images/Anomaly/{i:03d}.JPG"
        mrel = f"candle/Data/Masks/Anomaly/{i:03d}.png"
        Image.fromarray(_rgb_array(seed=50 + i)).save(_mk(root / rel), "JPEG")
        m = np.zeros((30, 40), np.uint8)
        m[:10, :10] = 1  # VisA masks may use small class values: nonzero is defect
        _save(m, root / mrel)
        rows.append(f"candle,test,anomaly,{rel},{mrel}")
    rows.append("pcb1,train,normal,pcb1/x.JPG,")
    _mk(root / "split_csv" / "1cls.csv").write_text("\n".join(rows) + "\n")
    return root


def _mk(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def test_visa_splits(visa_root: Path) -> None:
    train = VisADataset(visa_root, "candle", "train", image_size=32)
    assert len(train) == 3 and train.labels == [0, 0, 0]
    test = VisADataset(visa_root, "candle", "test", image_size=32)
    assert test.labels == [0, 1, 1] and test.has_masks
    assert test.defect_types == ["good", "anomaly", "anomaly"]
    item = test[1]
    assert item["image"].shape == (3, 32, 32) and item["mask"].shape == (1, 32, 32)
    assert item["mask"][0, :8, :8].all() and item["mask"].sum() < 32 * 32 / 4
    assert test[0]["mask"].sum() == 0


def test_visa_errors(visa_root: Path, tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="candle, pcb1"):
        VisADataset(visa_root, "capsules", "train")
    with pytest.raises(DatasetError, match=r"pcb1[/\\]x\.JPG"):  # listed but not on disk
        VisADataset(visa_root, "pcb1", "train")
    with pytest.raises(DatasetError, match="1cls.csv"):
        VisADataset(tmp_path, "candle", "train")
    bad = tmp_path / "bad.csv"
    bad.write_text("object,split,image\ncandle,train,a.png\n")
    with pytest.raises(DatasetError, match="label"):
        VisADataset(visa_root, "candle", "train", split_csv=bad)


# --------------------------------------------------------------------------- folders


@pytest.fixture()
def folder_tree(tmp_path: Path) -> Path:
    for i in range(4):
        _save(_rgb_array(seed=i), tmp_path / "normal" / f"n{i}.png")
    for i in range(2):
        _save(_rgb_array(seed=10 + i), tmp_path / "test_ok" / f"ok{i}.jpg")
    _save(_rgb_array(seed=20), tmp_path / "defect" / "d0.png")
    _save(_rgb_array(seed=21), tmp_path / "defect" / "d1.bmp")
    _save_mask(tmp_path / "masks" / "d0.png", (0, 10, 0, 10))
    _save_mask(tmp_path / "masks" / "d1_mask.png", (10, 20, 10, 20))
    return tmp_path


def test_folder_train_and_test_with_masks(folder_tree: Path) -> None:
    train = FolderDataset(folder_tree / "normal", "train", image_size=32)
    assert len(train) == 4 and train.labels == [0] * 4
    test = FolderDataset(
        folder_tree / "normal",
        "test",
        32,
        test_normal_dir=folder_tree / "test_ok",
        test_abnormal_dir=folder_tree / "defect",
        mask_dir=folder_tree / "masks",
    )
    assert test.labels == [0, 0, 1, 1] and test.has_masks
    assert test.defect_types == ["good", "good", "defect", "defect"]
    assert test[2]["mask"].sum() > 0 and test[3]["mask"].sum() > 0 and test[0]["mask"].sum() == 0


def test_folder_without_masks(folder_tree: Path) -> None:
    test = FolderDataset(
        None,
        "test",
        32,
        test_normal_dir=folder_tree / "test_ok",
        test_abnormal_dir=folder_tree / "defect",
    )
    assert not test.has_masks and test.labels == [0, 0, 1, 1]
    assert all(test[i]["mask"].sum() == 0 for i in range(len(test)))


def test_folder_missing_mask_and_empty_folder(folder_tree: Path) -> None:
    (folder_tree / "masks" / "d1_mask.png").unlink()
    with pytest.raises(DatasetError, match=r"d1\.bmp"):
        FolderDataset(
            None, "test", 32, test_abnormal_dir=folder_tree / "defect", mask_dir=folder_tree / "masks"
        )
    (folder_tree / "empty").mkdir()
    (folder_tree / "empty" / "readme.txt").write_text("no images here")
    with pytest.raises(DatasetError, match=r"no images found in '.*empty'.*\.png, \.jpg"):
        FolderDataset(folder_tree / "empty", "train")
    with pytest.raises(DatasetError, match="does not exist"):
        FolderDataset(folder_tree / "typo", "train")
    with pytest.raises(DatasetError, match="test_normal_dir"):
        FolderDataset(folder_tree / "normal", "test")


# --------------------------------------------------------------------------- helpers


def test_discover_categories(mvtec_root: Path, visa_root: Path, tmp_path: Path) -> None:
    assert discover_categories(mvtec_root) == ["cat_a", "cat_b"]
    assert discover_categories(visa_root) == ["candle", "pcb1"]
    (tmp_path / "nothing").mkdir()
    with pytest.raises(DatasetError, match="no categories"):
        discover_categories(tmp_path / "nothing")


def test_detect_format_and_make_dataset(
    mvtec_root: Path, visa_root: Path, folder_tree: Path
) -> None:
    assert detect_format(mvtec_root, "cat_a") == "mvtec"
    assert detect_format(visa_root, "candle") == "visa"
    assert isinstance(make_dataset("auto", visa_root, "candle", "train", 32), VisADataset)
    assert isinstance(make_dataset("mvtec", mvtec_root, "cat_a", "test", 32), MVTecDataset)
    folder = make_dataset("folder", folder_tree / "normal", None, "train", 32)
    assert isinstance(folder, FolderDataset) and len(folder) == 4
    with pytest.raises(DatasetError, match="unknown dataset kind"):
        make_dataset("coco", mvtec_root, "cat_a", "train")
