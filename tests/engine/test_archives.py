"""Image archives: every accepted format and layout, and every refusal with its code."""
from __future__ import annotations

import io
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root: tests.builders
from tests import builders as B  # noqa: E402
from worker.adaptation.data import archives as A  # noqa: E402
from worker.adaptation.data.archives.reader import Reader  # noqa: E402
from worker.adaptation.data.images import detect_format, open_image_set  # noqa: E402
from worker.adaptation.errors import AdaptationError  # noqa: E402

torch.set_num_threads(1)


def open_set(path, **kw):
    kw.setdefault("num_workers", 0)
    return A.ArchiveImageSet(path, **kw)


def all_pixels(s, batch_size=4, order=None) -> tuple[np.ndarray, np.ndarray]:
    xs, idx = zip(*s.batches(batch_size, order))
    return torch.cat(xs).numpy(), torch.cat(idx).numpy()


def expected(pixels: dict[str, np.ndarray]) -> np.ndarray:
    return np.stack([pixels[k] for k in sorted(pixels)])


def refused(code: str, fn, *args, **kw) -> AdaptationError:
    with pytest.raises(AdaptationError) as info:
        result = fn(*args, **kw)
        if isinstance(result, A.ArchiveImageSet):  # lazy failures show when decoding
            all_pixels(result)
    assert info.value.code == code, (info.value.code, info.value.message)
    return info.value


# --- formats and layouts ----------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["zip", "tar", "tar.gz"])
def test_flat_archive_unlabelled(tmp_path, fmt):
    path, pixels = B.image_archive(tmp_path / f"a.{fmt}", fmt, layout="flat", per_class=3)
    s = open_set(path)
    assert len(s) == 6 and s.labels is None and s.class_names is None
    assert s.image_size == (8, 8) and s.channels == 3
    x, idx = all_pixels(s)
    assert x.dtype == np.uint8 and x.shape == (6, 8, 8, 3)
    np.testing.assert_array_equal(x, expected(pixels))
    np.testing.assert_array_equal(idx, np.arange(6))
    s.close()


@pytest.mark.parametrize("fmt", ["zip", "tar", "tar.gz"])
def test_folder_per_class_gives_sorted_labels(tmp_path, fmt):
    path, pixels = B.image_archive(tmp_path / f"a.{fmt}", fmt, layout="classes",
                                   classes=("zebra", "ant", "moth"), per_class=2)
    s = open_set(path)
    assert s.class_names == ["ant", "moth", "zebra"]
    np.testing.assert_array_equal(s.labels, [0, 0, 1, 1, 2, 2])
    assert s.labels.dtype == np.int64
    np.testing.assert_array_equal(all_pixels(s)[0], expected(pixels))
    assert s.names[0] == "ant/img_000.png"


def test_wrapper_folder_is_stripped(tmp_path):
    path, pixels = B.image_archive(tmp_path / "a.zip", layout="classes", wrapper="my_dataset", per_class=2)
    s = open_set(path)
    assert s.class_names == ["cat", "dog"]
    assert any("wrapper" in n for n in s.notes)


def test_single_folder_is_a_wrapper_not_one_class(tmp_path):
    path, _ = B.image_archive(tmp_path / "a.zip", layout="classes", classes=("only",), per_class=3)
    s = open_set(path)
    assert s.labels is None and len(s) == 3


def test_detect_format(tmp_path):
    zip_path, _ = B.image_archive(tmp_path / "a.zip", "zip")
    tar_path, _ = B.image_archive(tmp_path / "a.tar", "tar")
    tgz_path, _ = B.image_archive(tmp_path / "a.tgz", "tar.gz")
    npz_path = tmp_path / "a.npz"
    np.savez(npz_path, x=np.zeros((2, 4, 4), np.uint8))
    assert detect_format(zip_path) == "zip"
    assert detect_format(tar_path) == "tar"
    assert detect_format(tgz_path) == "tar"
    assert detect_format(npz_path) == "npz"
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\x00" * 600)
    with pytest.raises(AdaptationError) as info:
        detect_format(junk)
    assert info.value.code == "unsupported_format"


@pytest.mark.parametrize("fmt", ["zip", "tar", "tar.gz"])
def test_open_image_set_dispatches_archives(tmp_path, fmt):
    path, pixels = B.image_archive(tmp_path / "a.bin", fmt, layout="classes", per_class=2)
    s = open_image_set(path, preprocess_size=32, num_workers=0)  # format detected from the bytes
    assert isinstance(s, A.ArchiveImageSet) and len(s) == 4
    assert s.image_size == (8, 8)  # one size: not resized on the CPU (the device resizes batches)
    np.testing.assert_array_equal(all_pixels(s)[0], expected(pixels))


def test_open_image_set_npz_accepts_preprocess_size(tmp_path):
    p = tmp_path / "d.npz"
    np.savez(p, x=np.zeros((3, 4, 4), np.uint8), y=np.arange(3))
    s = open_image_set(p, "npz", preprocess_size=8)
    assert len(s) == 3


@pytest.mark.parametrize("image_format", ["PNG", "JPEG", "WEBP"])
def test_image_formats(tmp_path, image_format):
    from PIL import Image

    files, pixels = B.image_files(image_format=image_format, size=(16, 16), per_class=2)
    x, _ = all_pixels(open_set(B.build_zip(tmp_path / "a.zip", files)))
    if image_format == "JPEG":  # lossy: the same pixels as Pillow decoding the file on its own
        ref = np.stack([np.asarray(Image.open(io.BytesIO(files[k]))) for k in sorted(files)])
    else:
        ref = expected(pixels)
    np.testing.assert_array_equal(x, ref)


@pytest.mark.parametrize("mode,channels", [("L", 1), ("RGB", 3), ("RGBA", 4)])
def test_channel_modes(tmp_path, mode, channels):
    path, pixels = B.image_archive(tmp_path / "a.tar", "tar", mode=mode, per_class=2)
    s = open_set(path)
    assert s.channels == channels
    x, _ = all_pixels(s)
    assert x.shape[-1] == channels
    np.testing.assert_array_equal(x, expected(pixels))


def test_mixed_modes_are_converted_to_the_widest(tmp_path):
    gray = B.random_image(8, 8, "L", seed=1)
    rgb = B.random_image(8, 8, "RGB", seed=2)
    path = B.build_zip(tmp_path / "a.zip", {"a.png": B.encode_image(gray), "b.png": B.encode_image(rgb)})
    s = open_set(path)
    x, _ = all_pixels(s)
    assert s.channels == 3 and x.shape == (2, 8, 8, 3)
    np.testing.assert_array_equal(x[0], np.repeat(gray, 3, axis=-1))
    np.testing.assert_array_equal(x[1], rgb)
    assert any("mixed channel" in n for n in s.notes)


def test_palette_and_16_bit_png(tmp_path):
    from PIL import Image

    pal = Image.fromarray(B.random_image(8, 8, "RGB")).convert("P")
    wide = np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000
    buf1, buf2 = io.BytesIO(), io.BytesIO()
    pal.save(buf1, "PNG")
    Image.fromarray(wide).save(buf2, "PNG")  # 16-bit greyscale
    s = open_set(B.build_zip(tmp_path / "p.zip", {"p.png": buf1.getvalue()}))
    assert s.channels == 3
    np.testing.assert_array_equal(all_pixels(s)[0][0], np.asarray(pal.convert("RGB")))
    s = open_set(B.build_zip(tmp_path / "w.zip", {"w.png": buf2.getvalue()}))
    assert s.channels == 1
    np.testing.assert_array_equal(all_pixels(s)[0][0, ..., 0], (wide >> 8).astype(np.uint8))


def test_mixed_sizes_are_resized_to_the_spec_size_on_the_cpu(tmp_path):
    from PIL import Image

    a, b = B.random_image(10, 12, seed=1), B.random_image(16, 16, seed=2)
    path = B.build_zip(tmp_path / "a.zip", {"a.png": B.encode_image(a), "b.png": B.encode_image(b)})
    s = open_set(path, preprocess_size=16)
    x, _ = all_pixels(s)
    assert s.image_size == (16, 16) and x.shape == (2, 16, 16, 3)
    np.testing.assert_array_equal(x[0], np.asarray(Image.fromarray(a).resize((16, 16), Image.Resampling.BILINEAR)))
    np.testing.assert_array_equal(x[1], b)  # already the right size: untouched
    assert any("resized" in n for n in s.notes)


def test_order_and_indices(tmp_path):
    path, pixels = B.image_archive(tmp_path / "a.zip", per_class=4)
    s = open_set(path)
    order = np.array([5, 0, 7, 2, 1, 3, 6, 4])
    x, idx = all_pixels(s, batch_size=3, order=order)
    np.testing.assert_array_equal(idx, order)
    np.testing.assert_array_equal(x, expected(pixels)[order])


@pytest.mark.parametrize("fmt", ["zip", "tar.gz"])
def test_loader_workers_give_the_same_batches(tmp_path, fmt):
    path, pixels = B.image_archive(tmp_path / f"a.{fmt}", fmt, per_class=5)
    s = open_set(path, num_workers=2)
    order = np.random.default_rng(0).permutation(10)
    x, idx = all_pixels(s, batch_size=2, order=order)  # 5 batches: enough to start workers
    np.testing.assert_array_equal(idx, order)
    np.testing.assert_array_equal(x, expected(pixels)[order])


def test_worker_errors_keep_their_code(tmp_path):
    files, _ = B.image_files(per_class=5)
    name = sorted(files)[7]
    files[name] = files[name][: len(files[name]) // 2]
    s = open_set(B.build_zip(tmp_path / "a.zip", files), num_workers=2)
    with pytest.raises(AdaptationError) as info:
        all_pixels(s, batch_size=2)
    assert info.value.code == "truncated_image" and info.value.detail["entry"] == name


def test_decoding_is_lazy_and_per_batch(tmp_path, monkeypatch):
    """Nothing is decoded while indexing; iterating decodes one batch at a time."""
    path, _ = B.image_archive(tmp_path / "a.zip", per_class=10)
    calls = []
    real = Reader.decode
    monkeypatch.setattr(Reader, "decode", lambda self, i: calls.append(i) or real(self, i))
    s = open_set(path)
    assert calls == []
    it = s.batches(4)
    next(it)
    assert len(calls) == 4
    assert not any(isinstance(v, (np.ndarray, torch.Tensor)) and v.ndim == 4 for v in vars(s).values())


def test_ignored_entries_are_reported(tmp_path):
    files, pixels = B.image_files(per_class=1)
    files.update({"__MACOSX/._img_000.png": b"junk", ".DS_Store": b"junk", "cat/.hidden.png": b"x",
                  "Thumbs.db": b"junk", "emptydir/": b""})
    s = open_set(B.build_zip(tmp_path / "a.zip", files))
    assert len(s) == 2
    assert any("ignored 4 entries" in n for n in s.notes)


def test_tar_gz_spill_file_is_removed(tmp_path):
    spill = tmp_path / "spill"
    spill.mkdir()
    path, _ = B.image_archive(tmp_path / "a.tgz", "tar.gz")
    s = open_set(path, spill_dir=str(spill))
    assert len(list(spill.iterdir())) == 1
    all_pixels(s)
    s.close()
    assert list(spill.iterdir()) == []


def test_pillow_decompression_bomb_guard_is_on():
    from PIL import Image

    assert Image.MAX_IMAGE_PIXELS is not None


# --- refusals ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["../evil.png", "a/../../evil.png", "/etc/evil.png", "C:/evil.png",
                                  "..\\evil.png"])
def test_path_traversal_zip(tmp_path, name):
    files, _ = B.image_files(per_class=1)
    files[name] = B.encode_image(B.random_image())
    err = refused("archive_path_traversal", open_set, B.build_zip(tmp_path / "a.zip", files))
    assert err.detail["entry"] == name


@pytest.mark.parametrize("gz", [False, True])
def test_path_traversal_tar(tmp_path, gz):
    files, _ = B.image_files(per_class=1)
    files["/abs/evil.png"] = B.encode_image(B.random_image())
    refused("archive_path_traversal", open_set, B.build_tar(tmp_path / "a.tar", files, gz=gz))
    files = {"ok/../../x.png": B.encode_image(B.random_image())}
    refused("archive_path_traversal", open_set, B.build_tar(tmp_path / "b.tar", files, gz=gz))


def test_zip_symlink(tmp_path):
    refused("archive_symlink", open_set, B.zip_with_symlink(tmp_path / "a.zip"))


@pytest.mark.parametrize("kind", ["symlinks", "hardlinks", "devices"])
@pytest.mark.parametrize("gz", [False, True])
def test_tar_links_and_devices(tmp_path, kind, gz):
    files, _ = B.image_files(per_class=1)
    extra = {"symlinks": {"link.png": "/etc/passwd"}, "hardlinks": {"hard.png": "img_000.png"},
             "devices": ["dev.png"]}[kind]
    path = B.build_tar(tmp_path / "a.tar", files, gz=gz, **{kind: extra})
    refused("archive_symlink", open_set, path)


@pytest.mark.parametrize("fmt", ["zip", "tar", "tar.gz"])
def test_too_many_entries(tmp_path, fmt):
    path, _ = B.image_archive(tmp_path / "a.bin", fmt, per_class=3)
    refused("archive_too_many_entries", open_set, path, max_entries=5)
    assert len(open_set(path, max_entries=6)) == 6


@pytest.mark.parametrize("fmt", ["zip", "tar", "tar.gz"])
def test_total_uncompressed_size(tmp_path, fmt):
    path, _ = B.image_archive(tmp_path / "a.bin", fmt, per_class=3, size=(16, 16))
    refused("archive_too_large", open_set, path, max_total_bytes=1000)


def test_entry_size_limit(tmp_path):
    path, _ = B.image_archive(tmp_path / "a.zip", per_class=1, size=(16, 16))
    refused("archive_too_large", open_set, path, max_entry_bytes=100)


def test_zip_bomb_entry_ratio(tmp_path):
    err = refused("archive_compression_ratio", open_set, B.zip_bomb(tmp_path / "bomb.zip"))
    assert err.detail["entry"] == "bomb_0.png"


def test_zip_bomb_total_ratio(tmp_path):
    # Each entry stays under the per-entry floor (1 MiB); together they expand ~1000x.
    path = B.zip_bomb(tmp_path / "bomb.zip", entry_bytes=512 << 10, entries=8)
    err = refused("archive_compression_ratio", open_set, path)
    assert "in total" in err.message


def test_tar_gz_bomb_is_stopped_while_streaming(tmp_path):
    spill = tmp_path / "spill"
    spill.mkdir()
    path = B.build_tar(tmp_path / "bomb.tgz", {"zeros.png": b"\x00" * (16 << 20)}, gz=True)
    assert path.stat().st_size < 100_000
    refused("archive_compression_ratio", open_set, path, spill_dir=str(spill))
    assert list(spill.iterdir()) == []  # the partial spill file is gone


def test_zip_overlapping_entries(tmp_path):
    refused("archive_compression_ratio", open_set, B.zip_with_overlapping_entries(tmp_path / "o.zip"))


def test_not_an_image(tmp_path):
    files, _ = B.image_files(per_class=1)
    files["notes.txt"] = b"hello, these are my images"
    err = refused("not_an_image", open_set, B.build_zip(tmp_path / "a.zip", files))
    assert err.detail["entry"] == "notes.txt" and "__MACOSX" in err.message


def test_other_image_formats_are_named(tmp_path):
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(B.random_image()).save(buf, "GIF")
    err = refused("unsupported_image_format", open_set, B.build_zip(tmp_path / "a.zip", {"a.gif": buf.getvalue()}))
    assert err.detail["format"] == "GIF"


@pytest.mark.parametrize("image_format", ["PNG", "JPEG", "WEBP"])
def test_truncated_image(tmp_path, image_format):
    data = B.encode_image(B.random_image(32, 32), image_format)
    good = B.encode_image(B.random_image(32, 32, seed=3), image_format)
    path = B.build_zip(tmp_path / "a.zip", {"a.img": good, "b.img": data[: len(data) // 2]})
    err = refused("truncated_image", open_set, path)  # WebP at indexing, PNG/JPEG when decoding
    assert err.detail["entry"] == "b.img"


@pytest.mark.parametrize("files", [{}, {"__MACOSX/._a.png": b"x", ".DS_Store": b"x"}, {"dir/": b""}])
@pytest.mark.parametrize("fmt", ["zip", "tar"])
def test_empty_archive(tmp_path, files, fmt):
    path = B.build_archive(tmp_path / "a.bin", files, fmt)
    refused("empty_archive", open_set, path, fmt=fmt)


def test_mixed_sizes_without_a_resize(tmp_path):
    files = {"a.png": B.encode_image(B.random_image(8, 8)), "b.png": B.encode_image(B.random_image(9, 8))}
    err = refused("mixed_image_sizes", open_set, B.build_zip(tmp_path / "a.zip", files))
    assert err.detail["sizes"] == 2


def test_image_pixel_limit(tmp_path):
    path, _ = B.image_archive(tmp_path / "a.zip", size=(16, 16), per_class=1)
    refused("image_too_large", open_set, path, max_pixels=200)


@pytest.mark.filterwarnings("ignore:Duplicate name")
def test_duplicate_entries(tmp_path):
    png = B.encode_image(B.random_image())
    refused("archive_duplicate_entry", open_set, B.build_zip(tmp_path / "a.zip", [("a.png", png), ("a.png", png)]))
    refused("archive_duplicate_entry", open_set, B.build_tar(tmp_path / "a.tar", [("a.png", png), ("./a.png", png)]))


def test_layout_mixing_flat_and_folders(tmp_path):
    png = B.encode_image(B.random_image())
    path = B.build_zip(tmp_path / "a.zip", {"a.png": png, "cat/b.png": png, "cat/x/y/c.png": png})
    err = refused("invalid_archive_layout", open_set, path)
    assert err.detail["top_level_examples"] == ["a.png"]


def test_encrypted_zip_entry(tmp_path):
    refused("archive_encrypted", open_set, B.zip_with_encrypted_entry(tmp_path / "a.zip"))


def test_corrupt_zip_entry_fails_its_crc(tmp_path):
    data = B.encode_image(B.random_image(16, 16))
    path = B.build_zip(tmp_path / "a.zip", {"a.png": data}, compression=zipfile.ZIP_STORED)
    raw = bytearray(path.read_bytes())
    at = raw.index(data) + len(data) - 20  # inside the image data, after its header
    raw[at] ^= 0xFF
    path.write_bytes(bytes(raw))
    refused("invalid_archive", open_set, path)


def test_unreadable_archives(tmp_path):
    bad_tar = tmp_path / "bad.tgz"
    bad_tar.write_bytes(b"\x1f\x8b" + b"\x00" * 100)
    refused("invalid_archive", open_set, bad_tar, fmt="tar")
    bad_zip = tmp_path / "bad.zip"
    bad_zip.write_bytes(b"PK\x03\x04" + b"\x00" * 100)
    refused("invalid_archive", open_set, bad_zip, fmt="zip")


def test_truncated_tar(tmp_path):
    path, _ = B.image_archive(tmp_path / "a.tar", "tar", per_class=2, size=(32, 32))
    raw = path.read_bytes()
    cut = raw.rindex(b"\x89PNG") + 100  # inside the last image's data
    path.write_bytes(raw[:cut])
    refused("invalid_archive", open_set, path)


@pytest.mark.parametrize("compression", [zipfile.ZIP_STORED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA])
def test_zip_compression_methods(tmp_path, compression):
    files, pixels = B.image_files(per_class=2)
    path = B.build_zip(tmp_path / "a.zip", files, compression=compression)
    np.testing.assert_array_equal(all_pixels(open_set(path))[0], expected(pixels))


def test_tar_without_ustar_magic_is_not_detected(tmp_path):
    path, _ = B.image_archive(tmp_path / "a.tar", "tar")
    with tarfile.open(path) as tf:
        assert tf.next() is not None
    raw = bytearray(path.read_bytes())
    raw[257:262] = b"\x00" * 5
    path.write_bytes(bytes(raw))
    with pytest.raises(AdaptationError) as info:
        detect_format(path)
    assert info.value.code == "unsupported_format"


@pytest.mark.parametrize("fmt", ["zip", "tar", "tar.gz"])
def test_image_header_longer_than_the_peek(tmp_path, fmt):
    """A PNG whose metadata before the pixels exceeds the 64 KiB read while indexing."""
    from PIL import Image, PngImagePlugin

    arr = B.random_image(8, 8)
    info = PngImagePlugin.PngInfo()
    info.add_text("comment", "x" * (A.PEEK_BYTES + 1000))
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG", pnginfo=info)
    assert buf.getbuffer().nbytes > A.PEEK_BYTES
    s = open_set(B.build_archive(tmp_path / "a.bin", {"a.png": buf.getvalue()}, fmt))
    np.testing.assert_array_equal(all_pixels(s)[0][0], arr)
