"""Every bad request gets a precise 4xx with the error body of app/errors.py and the field path."""
from __future__ import annotations

import httpx
import pytest

from tests.helpers import tent_spec, upload_assets


@pytest.fixture(scope="module")
def uploaded(pg_service, assets):
    from app.client import Client

    with Client(pg_service.url) as c:
        return upload_assets(c, assets)


def post_job(service, spec, **headers):
    return httpx.post(f"{service.url}/v1/jobs", json=spec, headers=headers)


def assert_error(r: httpx.Response, status: int, code: str) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code and err["message"], err
    return err


def test_unknown_method(pg_service, uploaded, assets):
    err = assert_error(post_job(pg_service, tent_spec(uploaded, assets, method="magic")), 422, "unknown_method")
    assert err["detail"]["field"] == "method" and "tent" in err["detail"]["known"]


def test_params_checked_against_method_schema(pg_service, uploaded, assets):
    err = assert_error(post_job(pg_service, tent_spec(uploaded, assets, params={"lr": -1})), 422, "invalid_params")
    assert err["detail"]["errors"][0]["field"] == "params.lr"
    err = assert_error(post_job(pg_service, tent_spec(uploaded, assets, params={"learning_rate": 1})), 422,
                       "invalid_params")
    assert err["detail"]["errors"][0]["field"] == "params.learning_rate"


def test_unknown_upload_and_wrong_kind(pg_service, uploaded, assets):
    spec = tent_spec(uploaded, assets)
    spec["data"]["upload_id"] = "00000000-0000-0000-0000-000000000000"
    err = assert_error(post_job(pg_service, spec), 422, "unknown_upload")
    assert err["detail"]["field"] == "data.upload_id"
    spec = tent_spec(uploaded, assets)
    spec["model"]["upload_id"] = uploaded["target"]["id"]  # a dataset given as the model
    err = assert_error(post_job(pg_service, spec), 422, "invalid_upload_kind")
    assert err["detail"]["field"] == "model.upload_id"


@pytest.mark.parametrize("mutate, field", [
    (lambda s: s.pop("model"), "model"),
    (lambda s: s["model"].update(num_classes=0), "model.num_classes"),
    (lambda s: s["model"].update(architecture="alexnet"), "model.architecture"),
    (lambda s: s["options"].update(batch_size="big"), "options.batch_size"),
    (lambda s: s["options"].update(device="tpu"), "options.device"),
    (lambda s: s["preprocess"].update(mean=[0.1, 0.2]), "preprocess"),
    (lambda s: s.update(surprise=1), "surprise"),
])
def test_spec_shape_errors_name_the_field(pg_service, uploaded, assets, mutate, field):
    spec = tent_spec(uploaded, assets)
    mutate(spec)
    err = assert_error(post_job(pg_service, spec), 422, "validation_error")
    assert err["detail"]["errors"][0]["field"] == field


def test_not_json_and_unknown_ids(pg_service):
    r = httpx.post(f"{pg_service.url}/v1/jobs", content=b"{nope", headers={"Content-Type": "application/json"})
    assert_error(r, 422, "validation_error")
    assert_error(httpx.get(f"{pg_service.url}/v1/jobs/nope"), 404, "job_not_found")
    assert_error(httpx.post(f"{pg_service.url}/v1/jobs/nope/cancel"), 404, "job_not_found")
    assert_error(httpx.get(f"{pg_service.url}/v1/uploads/nope"), 404, "upload_not_found")
    assert_error(httpx.get(f"{pg_service.url}/v1/jobs", params={"cursor": "!!"}), 422, "validation_error")
    assert_error(httpx.post(f"{pg_service.url}/v1/uploads", params={"kind": "weights"}, content=b"x"), 422,
                 "validation_error")


def test_idempotency_key(pg_service, uploaded, assets):
    spec = tent_spec(uploaded, assets, method="source")
    first = post_job(pg_service, spec, **{"Idempotency-Key": "k-123"})
    again = post_job(pg_service, spec, **{"Idempotency-Key": "k-123"})
    assert first.status_code == again.status_code == 202
    assert first.json()["id"] == again.json()["id"]
    other = post_job(pg_service, spec, **{"Idempotency-Key": "k-456"})
    assert other.json()["id"] != first.json()["id"]
    spec["options"]["seed"] = 7
    assert_error(post_job(pg_service, spec, **{"Idempotency-Key": "k-123"}), 409, "idempotency_conflict")


def test_methods_and_health(pg_service):
    methods = httpx.get(f"{pg_service.url}/v1/methods").json()["methods"]
    by_name = {m["name"]: m for m in methods}
    assert {"source", "bn_adapt", "tent"} <= set(by_name)
    tent = by_name["tent"]
    assert tent["kind"] == "tta" and tent["params_schema"]["properties"]["lr"]["default"] == 1e-3
    # expected cost in passes over the target: one for test-time methods, the authors' schedule for SFDA
    assert tent["cost"] == {"epochs": 1, "forward_passes": 1, "backward_passes": 1}
    assert by_name["shot"]["cost"] == {"epochs": 15, "forward_passes": 30, "backward_passes": 15}
    assert httpx.get(f"{pg_service.url}/healthz").json() == {"status": "ok"}
    pg_service.wait_ready()  # its worker registers once started
    ready = httpx.get(f"{pg_service.url}/readyz").json()
    assert ready["checks"] == {"database": "ok", "broker": "ok", "blob_folder": "ok", "workers": "ok"}
    assert [w["can_run"] for w in ready["workers"]] == [True] and ready["workers"][0]["device"] == "cpu"


def test_job_list_pagination_and_filter(pg_service, uploaded, assets):
    from app.client import Client

    with Client(pg_service.url) as c:
        ids = [c.submit(tent_spec(uploaded, assets, method="source", options={"seed": 100 + i}))["id"]
               for i in range(3)]
        seen, cursor = [], None
        while True:
            page = c.jobs(limit=2, cursor=cursor)
            seen += [j["id"] for j in page["items"]]
            cursor = page["next_cursor"]
            if not cursor:
                break
        assert len(seen) == len(set(seen))
        assert seen.index(ids[2]) < seen.index(ids[1]) < seen.index(ids[0])  # newest first
        for job_id in ids:
            c.wait(job_id, timeout=300)
        assert all(j["status"] == "succeeded" for j in c.jobs(status="succeeded", limit=500)["items"])


def test_job_list_rows_are_summaries_unless_full_is_asked(pg_service, uploaded, assets):
    """List rows leave out the spec, params, artifacts and nested metric reports; view=full lists the
    jobs exactly as GET /v1/jobs/{id} returns them."""
    from app.client import Client

    with Client(pg_service.url) as c:
        job = c.wait(c.submit(tent_spec(uploaded, assets, method="source", options={"seed": 7}))["id"],
                     timeout=300)
        assert job["status"] == "succeeded" and job["artifacts"] and isinstance(job["metrics"]["target"], dict)
        row = next(j for j in c.jobs(limit=500)["items"] if j["id"] == job["id"])
        assert not {"spec", "params", "artifacts"} & set(row)
        assert row["metrics"] == {k: v for k, v in job["metrics"].items() if not isinstance(v, (dict, list))}
        assert {k: row[k] for k in ("status", "progress", "created_at", "finished_at")} == \
            {k: job[k] for k in ("status", "progress", "created_at", "finished_at")}
        full = next(j for j in c.jobs(limit=500, view="full")["items"] if j["id"] == job["id"])
        assert full == c.job(job["id"])
        r = httpx.get(f"{pg_service.url}/v1/jobs", params={"view": "everything"})
        assert_error(r, 422, "validation_error")


def test_concurrent_job_reads_each_get_their_own_job(pg_service, uploaded, assets):
    """GET /v1/jobs/{id} shares one database read among the requests that wait together
    (app.services.jobs.view_reader, app.db.batched): many at once, for several jobs and a missing one, each still gets
    exactly its own job, the same body as a lone request; and a new job is seen by the next read."""
    import asyncio

    from app.client import Client

    with Client(pg_service.url) as c:
        ids = [c.submit(tent_spec(uploaded, assets, method="source", options={"seed": 200 + i}))["id"]
               for i in range(3)]
        finals = {job_id: c.wait(job_id, timeout=300) for job_id in ids}
    wanted = [*ids, "no-such-job"] * 40

    async def burst():
        async with httpx.AsyncClient(base_url=pg_service.url, timeout=60) as ac:
            return await asyncio.gather(*(ac.get(f"/v1/jobs/{job_id}") for job_id in wanted))

    for job_id, r in zip(wanted, asyncio.run(burst())):
        if job_id == "no-such-job":
            assert_error(r, 404, "job_not_found")
        else:
            assert r.status_code == 200 and r.json() == finals[job_id]
    with Client(pg_service.url) as c:  # read your writes: a job is readable as soon as it is created
        job = c.submit(tent_spec(uploaded, assets, method="source", options={"seed": 299}))
        assert c.job(job["id"])["id"] == job["id"]
