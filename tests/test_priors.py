"""Class-ratio prior files (sfda_prior's `params.prior_upload`): the JSON and CSV forms, Bateson's sizes ×
tags, and every refusal with its code and position (app/checks/priors.py: the API and the worker read
them alike)."""
from __future__ import annotations

import json

import pytest

from app.checks import CheckError
from app.checks.priors import MAX_PRIOR_BYTES, image_key, read_prior


def rows(data: str | bytes, k: int = 3, n: int | None = 4) -> list[list[float]]:
    return read_prior(data.encode() if isinstance(data, str) else data).rows(k, n)


def refused(code: str, data: str | bytes, k: int = 3, n: int | None = 4) -> CheckError:
    with pytest.raises(CheckError) as info:
        rows(data, k, n)
    assert info.value.code == code, (info.value.code, info.value.message)
    return info.value


def test_json_one_row_for_every_image():
    assert rows("[2, 1, 1]") == [[0.5, 0.25, 0.25]]
    assert rows('{"proportions": [0.5, 0.25, 0.25]}') == [[0.5, 0.25, 0.25]]


def test_json_per_image_rows_of_proportions_or_pixel_counts():
    per_image = [[10, 0, 30], [1, 1, 2], [0.2, 0.3, 0.5], [5, 5, 0]]
    got = rows(json.dumps({"proportions": per_image}))
    assert got[0] == [0.25, 0.0, 0.75] and got[3] == [0.5, 0.5, 0.0]
    assert rows(json.dumps(per_image)) == got


def test_json_sizes_times_tags_bateson():
    """One typical size per class, each image's tags: a class the image does not hold gets 0."""
    got = rows(json.dumps({"sizes": [800, 150, 50], "tags": [[1, 1, 1], [1, 0, 1], [1, 1, 0], [1, 0, 0]],
                           "class_names": ["background", "prostate", "lesion"]}))
    assert got[0] == [0.8, 0.15, 0.05]
    assert got[1] == pytest.approx([800 / 850, 0, 50 / 850])
    assert got[3] == [1.0, 0.0, 0.0]
    assert rows(json.dumps({"sizes": [800, 150, 50], "tags": [[True, False, True]] * 4}))[0][1] == 0.0


def test_csv_with_class_names_tags_and_an_image_column():
    text = ("image,background,prostate,lesion,tag:background,tag:prostate,tag:lesion\n"
            "a.png,800,150,50,1,1,1\nb.png,800,150,50,1,0,1\n\nc.png,900,100,0,1,1,1\nd.png,1,1,1,1,1,0\n")
    got = rows(text)
    assert got[1] == pytest.approx([800 / 850, 0, 50 / 850]) and got[3] == [0.5, 0.5, 0.0]
    assert read_prior(text.encode()).class_names == ["background", "prostate", "lesion"]


def test_csv_with_indices_and_one_row():
    assert rows("0,1,2\n0.6,0.3,0.1\n") == [pytest.approx([0.6, 0.3, 0.1])]
    assert rows("\ufeff0,1,2\r\n6,3,1\r\n".encode("utf-8")) == [pytest.approx([0.6, 0.3, 0.1])]  # Excel's BOM and CRLF


def test_named_rows_are_matched_to_the_target_images_in_any_order():
    text = "image,0,1,2\nb.png,0,1,0\nsub/a.jpg,1,0,0\nc,0,0,1\n"
    names = ["set/images/a.png", "set/images/b.png", "set/images/c.png"]  # stored order: sorted paths
    assert read_prior(text.encode()).rows(3, 3, names) == [[1, 0, 0], [0, 1, 0], [0, 0, 1]]
    as_json = json.dumps({"sizes": [1, 1, 1], "tags": [[0, 1, 0], [1, 0, 0], [0, 0, 1]], "images": ["b", "a", "c"]})
    assert read_prior(as_json.encode()).rows(3, 3, names) == [[1, 0, 0], [0, 1, 0], [0, 0, 1]]
    npz = "image,0,1\n1,0,1\n0,1,0\n"  # an npz's images are named by their index
    assert read_prior(npz.encode()).rows(2, 2, ["0", "1"]) == [[1, 0], [0, 1]]
    assert read_prior(npz.encode()).rows(2, 2) == [[0, 1], [1, 0]]  # names unknown (yet): file order
    assert [image_key(n) for n in ("a/b/c.png", "c", "x.tar.gz", ".hidden", "d\\e.jpg")] == ["c", "c", "x.tar", ".hidden", "e"]


def test_named_rows_that_do_not_match_are_refused():
    text = "image,0,1,2\na.png,1,1,1\nzzz.png,1,1,1\n"
    with pytest.raises(CheckError) as err:
        read_prior(text.encode()).rows(3, 2, ["images/a.png", "images/b.png"])
    assert err.value.code == "prior_shape_mismatch"
    assert err.value.detail == {"images_without_row": ["images/b.png"], "rows_without_image": ["zzz.png"]}
    with pytest.raises(CheckError) as err:
        read_prior(b"image,0,1\na.png,1,1\n").rows(2, 2, ["x/a.png", "y/a.png"])
    assert err.value.code == "prior_shape_mismatch" and err.value.detail["repeated"] == ["a"]
    refused("invalid_prior", "image,0,1,2\na.png,1,1,1\na.jpg,1,1,1\n")        # one image named twice
    refused("invalid_prior", '{"sizes": [1, 1, 1], "tags": [[1, 1, 1]], "images": ["a", "b"]}')


def test_rows_unknown_until_the_worker_counts_the_images():
    assert len(rows("[[1,1,1],[1,2,1]]", n=None)) == 2


@pytest.mark.parametrize("data,detail", [
    ("[1, -1, 1]", {"row": 0, "column": 1}),
    ('{"proportions": [[1, 1, 1], [1, NaN, 1]]}', {"row": 1, "column": 1}),
    ("[1, Infinity, 1]", {"row": 0, "column": 1}),
    ('[1, "2", 1]', {"row": 0, "column": 1}),
    ("[[1, 1, 1], [1, 1]]", {"row": 1}),
    ("[[0, 0, 0]]", {"row": 0}),                                             # no class left
    ('{"sizes": [1, 1, 1], "tags": [[0, 0, 0]]}', {"row": 0}),              # every class tagged absent
    ('{"sizes": [1, 1, 1], "tags": [[1, 2, 1]]}', {"row": 0}),              # tags are 0/1
    ('{"proportions": [1, 1, 1], "tags": [[1, 1, 1]]}', {}),
    ('{"prior": [1, 1, 1]}', {"keys": ["prior"]}),
    ('{"sizes": [1, 1, 1], "class_names": ["a", "b"]}', {}),
    ("[1, 1", {}),                                                           # broken JSON
    ("0,1,2\n1,x,1\n", {"row": 0, "column": 1}),
    ("0,1,2\n1,1\n", {"row": 0}),
    ("1,2,3\n1,1,1\n", {"header": ["1", "2", "3"]}),                          # indices must be 0..K-1
    ("0.5,0.3,0.2\n0.4,0.4,0.2\n", {"header": ["0.5", "0.3", "0.2"]}),      # no header row
    ("a,a,b\n1,1,1\n", {}),                                                  # a class named twice
    ("0,1,2\n", {}),                                                         # no numbers
    ("a,b,c,tag:a,tag:c\n1,1,1,1,1\n", {}),                                  # a tag for every class
    ("0,1,2\n1,1,inf\n", {"row": 0, "column": 2}),
])
def test_invalid_prior_files(data, detail):
    err = refused("invalid_prior", data)
    assert detail.items() <= err.detail.items(), err.detail


def test_not_utf8_too_large_or_too_deep():
    refused("invalid_prior", b"\xff\xfe\x00")
    refused("invalid_prior", b"[" * 100_000)
    refused("invalid_prior", b"0,1,2\n" + b"1" * 200_000 + b",1,1\n")
    refused("invalid_prior", b"[" + b" " * MAX_PRIOR_BYTES + b"]")


def test_class_and_row_counts_must_match_the_job():
    err = refused("prior_shape_mismatch", "[1, 1]")
    assert err.detail == {"classes": 2, "num_classes": 3}
    err = refused("prior_shape_mismatch", "[[1,1,1],[1,1,1]]", n=5)
    assert err.detail == {"rows": 2, "images": 5}
    assert rows('{"sizes": [1, 1, 1], "tags": [[1, 1, 1]]}', n=5) == [[1 / 3] * 3]  # one row: every image


def test_a_prior_upload_is_in_use_while_its_job_is():
    """Deleting an upload a queued job names is refused (409 upload_in_use): the prior file counts."""
    from app.db.repo import _upload_ids

    spec = {"method": "sfda_prior", "params": {"prior_upload": "p1", "lr": 1e-4}, "model": {"upload_id": "m"},
            "data": {"upload_id": "d"}, "eval_data": None}
    assert _upload_ids(spec) == {"p1", "m", "d"}
    assert _upload_ids({**spec, "params": {"class_ratio_prior": [0.5, 0.5]}}) == {"m", "d"}
