"""aptp.train.data: the common sample format, each loader on tiny files, the procedural set, prompts."""

from __future__ import annotations

import csv
import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from aptp.errors import AptpError, ConfigError, DatasetError
from aptp.train.data import (
    ATTRIBUTE_VALUES,
    DATASET_FORMATS,
    CC3MCaptions,
    CocoCaptions,
    JsonlCaptions,
    ProceduralCaptions,
    collate_captioned,
    image_to_tensor,
    load_dataset,
    load_parti_prompts,
    load_prompts,
    procedural_prompts,
    resize_center_crop,
    tensor_to_image,
)
from aptp.train.data.procedural import COLOURS, COUNT_WORDS

PARTI = Path("/work/shared/data/PartiPrompts.tsv")
BAD_UTF8 = b"\xff\xfe caption \xc3\x28\n"
R = 16

# Distinct solid colours: a sample's pixels tell which image file it was read from.
PALETTE = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255)]


def solid(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (24, 20)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    # PNG keeps colours exact; JPEG is exercised by the .jpg names with a tolerance below.
    Image.new("RGB", size, colour).save(path)
    return path


def mean_rgb(pixel_values: torch.Tensor) -> tuple[int, ...]:
    return tuple(int(v) for v in ((pixel_values.mean(dim=(1, 2)) + 1) * 127.5).round())


def assert_colour(sample: dict, colour: tuple[int, int, int], tol: int = 6) -> None:
    assert sample["pixel_values"].shape == (3, R, R)
    assert sample["pixel_values"].dtype == torch.float32
    got = mean_rgb(sample["pixel_values"])
    assert max(abs(g - c) for g, c in zip(got, colour)) <= tol, (got, colour)


def write_lines(path: Path, lines: list[bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join(line if line.endswith(b"\n") else line + b"\n" for line in lines))
    return path


# --------------------------------------------------------------------------- common format


def test_resize_center_crop_keeps_the_central_square():
    # 3R x R: black | white | black thirds. The crop must be exactly the white middle.
    image = Image.new("RGB", (3 * R, R), (0, 0, 0))
    image.paste((255, 255, 255), (R, 0, 2 * R, R))
    out = image_to_tensor(resize_center_crop(image, R))
    assert out.shape == (3, R, R)
    assert torch.all(out == 1.0)
    # Tall image, downscaled 2x: rows of the middle third stay white away from the borders.
    tall = Image.new("RGB", (2 * R, 6 * R), (0, 0, 0))
    tall.paste((255, 255, 255), (0, 2 * R, 2 * R, 4 * R))
    out = image_to_tensor(resize_center_crop(tall, R))
    assert out.shape == (3, R, R)
    assert torch.all(out[:, 2:-2, :] > 0.95)
    assert out.min() >= -1.0 and out.max() <= 1.0


def test_tensor_round_trip_and_grey_alpha_inputs(tmp_path: Path):
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, (R, R, 3), dtype=np.uint8)
    tensor = image_to_tensor(Image.fromarray(array))
    assert -1.0 <= tensor.min() and tensor.max() <= 1.0
    assert np.array_equal(np.asarray(tensor_to_image(tensor)), array)
    # Greyscale and transparent files still give 3 channels; transparency becomes white.
    Image.new("L", (R, R), 0).save(tmp_path / "grey.png")
    Image.new("RGBA", (R, R), (255, 0, 0, 0)).save(tmp_path / "clear.png")
    lines = [json.dumps({"image": "grey.png", "text": "grey"}), json.dumps({"image": "clear.png", "text": "clear"})]
    dataset = JsonlCaptions(write_lines(tmp_path / "d.jsonl", [line.encode() for line in lines]), R)
    assert_colour(dataset[0], (0, 0, 0))
    assert_colour(dataset[1], (255, 255, 255))


def test_collate_captioned_stacks_and_checks_shapes():
    batch = [{"pixel_values": torch.full((3, R, R), float(i) / 4), "text": f"t{i}"} for i in range(3)]
    out = collate_captioned(batch)
    assert out["pixel_values"].shape == (3, 3, R, R)
    assert out["text"] == ["t0", "t1", "t2"]
    assert torch.equal(out["pixel_values"][2], batch[2]["pixel_values"])
    with pytest.raises(DatasetError, match="different shapes"):
        collate_captioned(batch + [{"pixel_values": torch.zeros(3, R + 1, R + 1), "text": "x"}])
    with pytest.raises(DatasetError, match="empty batch"):
        collate_captioned([])


def test_dataloader_over_a_file_dataset(tmp_path: Path):
    lines = []
    for i, colour in enumerate(PALETTE[:4]):
        solid(tmp_path / "img" / f"{i}.png", colour)
        lines.append(json.dumps({"image": f"img/{i}.png", "text": f"caption {i}"}).encode())
    dataset = load_dataset("jsonl", str(write_lines(tmp_path / "d.jsonl", lines)), R)
    loader = torch.utils.data.DataLoader(dataset, batch_size=3, collate_fn=collate_captioned)
    batches = list(loader)
    assert [b["pixel_values"].shape[0] for b in batches] == [3, 1]
    assert batches[1]["text"] == ["caption 3"]
    assert batches[0]["pixel_values"].shape == (3, 3, R, R)


# --------------------------------------------------------------------------- jsonl


def test_jsonl_reads_relative_and_absolute_paths_and_counts_bad_lines(tmp_path: Path, caplog):
    solid(tmp_path / "a" / "red.png", PALETTE[0])
    absolute = solid(tmp_path / "elsewhere" / "green.jpg", PALETTE[1])
    solid(tmp_path / "a" / "blue.png", PALETTE[2])
    lines = [
        json.dumps({"image": "a/red.png", "text": "a red square"}).encode(),
        BAD_UTF8,  # line 2: undecodable
        b"{not json",  # line 3
        b"",  # blank: ignored, not counted
        json.dumps({"image": str(absolute), "text": "  a green one  "}).encode(),
        json.dumps({"image": "a/blue.png"}).encode(),  # line 6: no caption
        json.dumps(["a/blue.png", "list"]).encode(),  # line 7: not an object
        json.dumps({"image": "a/absent.png", "text": "never downloaded"}).encode(),  # missing image
        json.dumps({"image": "a/blue.png", "text": "blue"}).encode(),
    ]
    file = write_lines(tmp_path / "captions.jsonl", lines)
    with caplog.at_level(logging.WARNING):
        dataset = JsonlCaptions(file, resolution=R)
    assert len(dataset) == 3
    assert dataset.skipped == 4
    assert dataset.missing == 1
    assert [dataset[i]["text"] for i in range(3)] == ["a red square", "a green one", "blue"]
    assert_colour(dataset[0], PALETTE[0])
    assert_colour(dataset[1], PALETTE[1], tol=12)  # JPEG
    assert_colour(dataset[2], PALETTE[2])
    warning = "\n".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "skipped 4 malformed lines" in warning and "line 2" in warning
    assert "skipped 1 samples whose image is missing" in warning


def test_jsonl_with_no_usable_sample_or_missing_path_fails(tmp_path: Path):
    file = write_lines(tmp_path / "bad.jsonl", [BAD_UTF8, b"[]", json.dumps({"image": "gone.png", "text": "x"}).encode()])
    with pytest.raises(DatasetError, match="no usable samples") as info:
        JsonlCaptions(file, R)
    assert str(file) in str(info.value)
    with pytest.raises(DatasetError, match="nowhere.jsonl"):
        JsonlCaptions(tmp_path / "nowhere.jsonl", R)


# --------------------------------------------------------------------------- cc3m


def test_cc3m_tsv_layout_maps_rows_to_images(tmp_path: Path, caplog):
    root = tmp_path / "cc3m"
    rows = [
        b"a red thing\thttp://x/0.jpg",
        b"missing image row\thttp://x/1.jpg",
        BAD_UTF8.rstrip(b"\n") + b"\thttp://x/2.jpg",  # undecodable, though its image exists
        b"a blue thing\thttp://x/3.jpg",
        b"no url here",  # malformed
        b"a yellow thing\thttp://x/5.jpg",
    ]
    write_lines(root / "Train_GCC-training.tsv", rows)
    solid(root / "images" / "0.jpg", PALETTE[0])
    solid(root / "images" / "2.jpg", PALETTE[1])
    solid(root / "images" / "000003.png", PALETTE[2])  # zero-padded names and other extensions
    solid(root / "images" / "sub" / "5.jpg", PALETTE[3])  # sharded sub-folders
    with caplog.at_level(logging.WARNING):
        dataset = load_dataset("cc3m", str(root), R)
    assert isinstance(dataset, CC3MCaptions)
    assert [dataset.caption(i) for i in range(len(dataset))] == ["a red thing", "a blue thing", "a yellow thing"]
    assert dataset.skipped == 2 and dataset.missing == 1
    assert_colour(dataset[0], PALETTE[0], tol=12)
    assert_colour(dataset[1], PALETTE[2])
    assert_colour(dataset[2], PALETTE[3], tol=12)
    assert any("line 3" in r.getMessage() and "skipped 2" in r.getMessage() for r in caplog.records)
    # The TSV itself as path, and a header line that is not a row.
    write_lines(root / "other" / "val.tsv", [b"caption\turl", b"a red thing\tu"])
    solid(root / "other" / "images" / "0.jpg", PALETTE[0])
    assert CC3MCaptions(root / "other" / "val.tsv", R).caption(0) == "a red thing"


def test_cc3m_img2dataset_layout_uses_sidecar_captions(tmp_path: Path):
    shard = tmp_path / "dl" / "00000"
    solid(shard / "000000000.jpg", PALETTE[0])
    (shard / "000000000.txt").write_text("a red photo\n", encoding="utf-8")
    solid(shard / "000000001.jpg", PALETTE[1])
    (shard / "000000001.txt").write_bytes(BAD_UTF8)  # undecodable caption
    (shard / "000000002.txt").write_text("failed download", encoding="utf-8")  # no image
    solid(shard / "000000003.jpg", PALETTE[2])  # no caption
    (shard / "000000000.json").write_text("{}")
    dataset = CC3MCaptions(tmp_path / "dl", R)
    assert len(dataset) == 1 and dataset.caption(0) == "a red photo"
    assert dataset.skipped == 2 and dataset.missing == 1
    assert_colour(dataset[0], PALETTE[0], tol=12)


def test_cc3m_errors_name_the_problem(tmp_path: Path):
    with pytest.raises(DatasetError, match="no usable samples"):
        write_lines(tmp_path / "a" / "x.tsv", [b"caption\turl", b"only\tu"])
        (tmp_path / "a" / "images").mkdir()
        CC3MCaptions(tmp_path / "a", R)
    write_lines(tmp_path / "b" / "x.tsv", [b"c\tu"])
    with pytest.raises(DatasetError, match="image folder"):
        CC3MCaptions(tmp_path / "b", R)
    write_lines(tmp_path / "b" / "y.tsv", [b"c\tu"])
    with pytest.raises(DatasetError, match="captions_file"):
        CC3MCaptions(tmp_path / "b", R)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="neither"):
        CC3MCaptions(tmp_path / "empty", R)
    with pytest.raises(DatasetError, match="nothing-here"):
        CC3MCaptions(tmp_path / "nothing-here", R)


# --------------------------------------------------------------------------- coco


def write_coco(root: Path) -> Path:
    images = [
        {"id": 11, "file_name": "COCO_train2014_000000000011.jpg"},
        {"id": 22, "file_name": "COCO_train2014_000000000022.jpg"},  # never on disk
        {"id": 33, "file_name": "COCO_train2014_000000000033.png"},
        {"file_name": "no-id.jpg"},  # malformed
    ]
    annotations = [
        {"image_id": 33, "id": 1, "caption": "a blue one "},
        {"image_id": 11, "id": 2, "caption": "red, first"},
        {"image_id": 22, "id": 3, "caption": "lost image"},
        {"image_id": 11, "id": 4, "caption": "red, second"},
        {"image_id": 99, "id": 5, "caption": "unknown image id"},  # malformed
        {"image_id": 33, "id": 6},  # malformed: no caption
    ]
    solid(root / "train2014" / images[0]["file_name"], PALETTE[0])
    solid(root / "train2014" / images[2]["file_name"], PALETTE[2])
    file = root / "annotations" / "captions_train2014.json"
    file.parent.mkdir(parents=True)
    file.write_text(json.dumps({"info": {}, "images": images, "annotations": annotations}))
    return file


def test_coco_one_sample_per_caption_or_per_image(tmp_path: Path):
    file = write_coco(tmp_path / "coco")
    per_caption = load_dataset("coco", str(tmp_path / "coco"), R)
    assert isinstance(per_caption, CocoCaptions)
    assert [per_caption.caption(i) for i in range(len(per_caption))] == ["a blue one", "red, first", "red, second"]
    assert per_caption.skipped == 3 and per_caption.missing == 1
    assert_colour(per_caption[0], PALETTE[2])
    assert_colour(per_caption[2], PALETTE[0], tol=12)
    per_image = CocoCaptions(file, R, one_per_image=True)  # the JSON itself as path
    assert [per_image.caption(i) for i in range(len(per_image))] == ["a blue one", "red, first"]


def test_coco_errors(tmp_path: Path):
    file = write_coco(tmp_path / "coco")
    with pytest.raises(DatasetError, match="captions_val2014.json"):
        CocoCaptions(tmp_path / "coco", R, split="val2014")
    file.write_bytes(b'{"images": [\xff]}')
    with pytest.raises(DatasetError, match="not valid UTF-8 JSON"):
        CocoCaptions(file, R)
    file.write_text(json.dumps({"images": [], "annotations": []}))
    with pytest.raises(DatasetError, match="no usable samples"):
        CocoCaptions(file, R)


# --------------------------------------------------------------------------- factory


def test_factory_rejects_unknown_formats_options_and_paths(tmp_path: Path, caplog):
    with pytest.raises(DatasetError) as info:
        load_dataset("laion", "/data", R)
    for name in ("jsonl", "cc3m", "coco", "procedural"):
        assert name in str(info.value)
    assert set(DATASET_FORMATS) == {"jsonl", "cc3m", "coco", "procedural"}
    with pytest.raises(ConfigError, match="one_per_image"):
        load_dataset("jsonl", "x.jsonl", R, one_per_image=True)
    with pytest.raises(ConfigError, match="num_samples"):
        load_dataset("procedural", None, R)
    with pytest.raises(DatasetError, match="needs a path"):
        load_dataset("coco", None, R)
    with pytest.raises(DatasetError, match="missing-dir"):
        load_dataset("cc3m", str(tmp_path / "missing-dir"), R)
    with pytest.raises(ConfigError, match="resolution"):
        load_dataset("procedural", None, 0, num_samples=4)
    with caplog.at_level(logging.WARNING):
        load_dataset("procedural", "/ignored", R, num_samples=2)
    assert any("ignoring path" in r.getMessage() for r in caplog.records)
    dataset = load_dataset("Procedural", None, R, num_samples=5, seed=3)
    assert isinstance(dataset, ProceduralCaptions) and len(dataset) == 5 and dataset.seed == 3
    assert dataset[4]["pixel_values"].shape == (3, R, R)
    assert issubclass(DatasetError, AptpError)


# --------------------------------------------------------------------------- procedural


def test_procedural_is_deterministic_and_random_access():
    a = ProceduralCaptions(12, resolution=32, seed=7)
    b = ProceduralCaptions(12, resolution=32, seed=7)
    backwards = [b[i] for i in reversed(range(12))][::-1]
    for i in range(12):
        assert torch.equal(a[i]["pixel_values"], backwards[i]["pixel_values"])
        assert a[i]["text"] == backwards[i]["text"]
        assert a.attributes(i) == b.attributes(i)
    other = ProceduralCaptions(12, resolution=32, seed=8)
    assert any(not torch.equal(a[i]["pixel_values"], other[i]["pixel_values"]) for i in range(12))
    assert [a.caption(i) for i in range(12)] != [other.caption(i) for i in range(12)]
    assert procedural_prompts(12, seed=7) == [a.caption(i) for i in range(12)]
    # A longer dataset with the same seed starts with the same samples.
    assert ProceduralCaptions(20, resolution=32, seed=7).caption(11) == a.caption(11)
    with pytest.raises(IndexError):
        a[12]
    for bad in (dict(num_samples=0), dict(num_samples=3, text_fraction=1.5), dict(num_samples=3, seed="x")):
        with pytest.raises(ConfigError):
            ProceduralCaptions(**bad)


def test_procedural_text_fraction():
    assert not any(ProceduralCaptions(50, text_fraction=0.0).attributes(i)["is_text"] for i in range(50))
    assert all(ProceduralCaptions(50, text_fraction=1.0).attributes(i)["is_text"] for i in range(50))
    share = np.mean([ProceduralCaptions(400, text_fraction=0.25).attributes(i)["is_text"] for i in range(400)])
    assert 0.17 < share < 0.33


def _foreground(array: np.ndarray, colour: tuple[int, int, int]) -> np.ndarray:
    """Pixels closer to the shape colour than to the (grey, most common) background colour."""
    flat = array.reshape(-1, 3)
    values, counts = np.unique(flat, axis=0, return_counts=True)
    background = values[counts.argmax()].astype(float)
    to_colour = np.linalg.norm(array - np.array(colour, float), axis=-1)
    to_background = np.linalg.norm(array - background, axis=-1)
    return to_colour < to_background


def _caption_count(caption: str) -> int:
    words = {"a": 1, "an": 1, **{w: i + 1 for i, w in enumerate(COUNT_WORDS)}}
    return next(words[t] for t in caption.split() if t in words)


def test_procedural_captions_match_attributes_and_pixels():
    resolution = 64
    dataset = ProceduralCaptions(80, resolution=resolution, seed=1, text_fraction=0.3)
    seen_text = seen_single = 0
    for i in range(len(dataset)):
        attrs, caption = dataset.attributes(i), dataset.caption(i)
        array = np.asarray(tensor_to_image(dataset[i]["pixel_values"])).astype(float)
        assert array.shape == (resolution, resolution, 3)
        for key, values in ATTRIBUTE_VALUES.items():
            assert attrs[key] is None or attrs[key] in values, (key, attrs)
        assert attrs["colour"] in caption.split()
        mask = _foreground(array, COLOURS[attrs["colour"]])
        if attrs["is_text"]:
            seen_text += 1
            assert attrs["shape"] is None and attrs["word"] in caption.split()
            ys, xs = np.nonzero(mask)
            # Readable at 64 px: the word (or its sign) spans a good part of the image.
            assert ys.max() - ys.min() >= 0.15 * resolution and xs.max() - xs.min() >= 0.4 * resolution, caption
            continue
        assert attrs["word"] is None
        assert _caption_count(caption) == attrs["count"], caption
        noun = attrs["shape"] if attrs["count"] == 1 else attrs["shape"] + "s"
        assert noun in caption.split(), caption
        # One connected blob of the named colour per shape.
        _, blobs = ndimage.label(mask, structure=np.ones((3, 3)))
        assert blobs == attrs["count"], (caption, blobs)
        ys, xs = np.nonzero(mask)
        cy, cx = ys.mean() / resolution, xs.mean() / resolution
        expected = {
            "left": cx < 0.4, "right": cx > 0.6, "top": cy < 0.4, "bottom": cy > 0.6,
            "center": abs(cx - 0.5) < 0.1 and abs(cy - 0.5) < 0.1,
        }[attrs["position"]]
        assert expected, (caption, cx, cy)
        if attrs["count"] == 1:
            seen_single += 1
            # The shape's interior is drawn in exactly the named colour.
            inner = ndimage.binary_erosion(mask, iterations=1)
            colours, counts = np.unique(array[inner].astype(int), axis=0, return_counts=True)
            assert tuple(colours[counts.argmax()]) == COLOURS[attrs["colour"]], caption
    assert seen_text >= 10 and seen_single >= 5


# --------------------------------------------------------------------------- prompts


def test_load_prompts_txt_jsonl_tsv(tmp_path: Path, caplog):
    txt = write_lines(tmp_path / "p.txt", [b"a cat", b"", BAD_UTF8, "caf\u00e9 au lait  ".encode(), b"a dog\r"])
    with caplog.at_level(logging.WARNING):
        prompts = load_prompts(txt)
    assert prompts == ["a cat", "caf\u00e9 au lait", "a dog"] and prompts.skipped == 1
    assert any("line 3" in r.getMessage() for r in caplog.records)
    jsonl = write_lines(
        tmp_path / "p.jsonl",
        [b'{"text": "one"}', b'{"prompt": "two"}', b'{"caption": "no key"}', b"{oops", b'"bare string"'],
    )
    prompts = load_prompts(jsonl)
    assert prompts == ["one", "two"] and prompts.skipped == 3
    tsv = write_lines(
        tmp_path / "p.tsv",
        [b"Note\tPrompt\tCategory", b'n\tthe word "HI"\tc', b"only-one-field", b"n\t\tc", BAD_UTF8, b"n\tlast\tc"],
    )
    prompts = load_prompts(tsv)
    assert prompts == ['the word "HI"', "last"] and prompts.skipped == 3


def test_load_prompts_errors(tmp_path: Path):
    with pytest.raises(DatasetError, match="absent.txt"):
        load_prompts(tmp_path / "absent.txt")
    with pytest.raises(DatasetError, match="unsupported extension"):
        load_prompts(write_lines(tmp_path / "p.csv", [b"a"]))
    with pytest.raises(DatasetError, match="no usable samples"):
        load_prompts(write_lines(tmp_path / "p.txt", [BAD_UTF8, b"  "]))
    with pytest.raises(DatasetError, match="Prompt"):
        load_prompts(write_lines(tmp_path / "p.tsv", [b"Text\tCategory", b"a\tb"]))
    with pytest.raises(DatasetError, match="Challenge"):
        load_parti_prompts(write_lines(tmp_path / "q.tsv", [b"Prompt\tCategory", b"a\tb"]))


@pytest.mark.skipif(not PARTI.is_file(), reason=f"PartiPrompts file {PARTI} is absent")
def test_parti_prompts_real_file():
    rows = load_parti_prompts(PARTI)
    assert len(rows) == 1632 and rows.skipped == 0
    # Cross-check against an independent reader of the same file.
    with open(PARTI, encoding="utf-8", newline="") as f:
        reference = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    assert [r["prompt"] for r in rows] == [r["Prompt"].strip() for r in reference]
    assert [r["challenge"] for r in rows] == [r["Challenge"].strip() for r in reference]
    assert {"Writing & Symbols", "Quantity", "Basic"} <= {r["challenge"] for r in rows}
    assert any(re.search(r'"[A-Z]+"', r["prompt"]) for r in rows if r["challenge"] == "Writing & Symbols")
    assert load_prompts(PARTI) == [r["prompt"] for r in rows]
