"""Finding runs again over the API: unique id prefixes (tenant-scoped, a minimum length, an ambiguous
prefix answered with the caller's own candidates only), `name` and `tags` stored and filtered, and a
job's own log lines after a cursor. Both backends (the prefix match and the filters are SQL)."""
from __future__ import annotations

import uuid

import pytest

from app.db.models import JobLog, utcnow
from app.db.session import session_scope
from tests.helpers import add_jobs, db_url
from tests.ux_helpers import spec_kwargs

pytestmark = pytest.mark.services


def test_unique_prefixes_are_accepted_within_the_tenant(service, client):
    stem = uuid.uuid4().hex[:6]
    mine = [f"{stem}a0-0000-4000-8000-000000000000", f"{stem}a1-0000-4000-8000-000000000000"]
    theirs = f"{stem}a2-0000-4000-8000-000000000000"
    add_jobs(service, {"default": mine, "someone-else": [theirs]})

    assert client.job(mine[0][:8])["id"] == mine[0]              # what `adaptd jobs` shows
    assert client.job(mine[1][:8].upper())["id"] == mine[1]       # case-insensitive
    r = client.http.get(f"/v1/jobs/{stem}a")
    assert r.status_code == 409, r.text
    err = r.json()["error"]
    assert err["code"] == "ambiguous_job_id" and err["detail"]["matches"] == mine  # not the other tenant's
    assert theirs not in r.text
    assert client.http.get(f"/v1/jobs/{theirs[:8]}").json()["error"]["code"] == "job_not_found"
    r = client.http.get(f"/v1/jobs/{stem[:5]}")
    assert r.status_code == 422 and r.json()["error"]["detail"]["min_length"] == 6
    # Every route that takes a job id takes a prefix.
    assert client.http.post(f"/v1/jobs/{mine[0][:8]}/cancel").json()["id"] == mine[0]
    r = client.http.get(f"/v1/jobs/{mine[0][:8]}/artifacts/model.safetensors")
    assert r.json()["error"]["code"] == "artifact_not_found"
    assert client.http.get(f"/v1/jobs/{mine[0][:8]}/logs").json()["job_id"] == mine[0]
    assert client.http.delete(f"/v1/jobs/{mine[1][:8]}").status_code == 204
    assert client.job(f"{stem}a")["id"] == mine[0]  # no longer ambiguous


def test_name_and_tags_are_stored_and_filtered(service, client, assets):
    run = uuid.uuid4().hex[:8]
    made = []
    for name, tags in ((f"a-{run}", [f"t-{run}", "digits"]), (f"a-{run}", [f"t-{run}"]), (f"b-{run}", [f"t-{run}"])):
        job = client.submit(**spec_kwargs(assets), name=name, tags=tags)
        client.cancel(job["id"])  # queued: cancelled at once; nothing needs to run here
        made.append(job)
    assert made[0]["name"] == f"a-{run}" and made[0]["tags"] == [f"t-{run}", "digits"]

    def ids(**filters) -> list[str]:
        return [j["id"] for j in client.jobs(**filters)["items"]]

    assert ids(name=f"a-{run}") == [made[1]["id"], made[0]["id"]]          # newest first
    assert ids(tags=[f"t-{run}"]) == [j["id"] for j in reversed(made)]
    assert ids(tags=[f"t-{run}", "digits"]) == [made[0]["id"]]             # every tag must match
    assert ids(name=f"b-{run}", tags=["digits"]) == []
    assert client.job(made[0]["id"])["tags"] == [f"t-{run}", "digits"]
    r = client.http.post("/v1/jobs", json={**client.job(made[0]["id"])["spec"], "tags": ["has space"]})
    assert r.status_code == 422 and "tags" in r.json()["error"]["message"]


def test_log_lines_after_a_cursor(service, client):
    job_id = str(uuid.uuid4())
    add_jobs(service, {"default": [job_id], "someone-else": [other := str(uuid.uuid4())]})
    with session_scope(db_url(service)) as s:
        for jid in (job_id, other):
            s.add_all(JobLog(job_id=jid, at=utcnow(), level="INFO", message=f"{jid} line {i}") for i in range(5))
    page = client.http.get(f"/v1/jobs/{job_id}/logs", params={"limit": 3}).json()
    assert [r["message"] for r in page["items"]] == [f"{job_id} line {i}" for i in range(3)] and page["more"]
    rest = client.http.get(f"/v1/jobs/{job_id}/logs", params={"after": page["next_after"]}).json()
    assert [r["message"] for r in rest["items"]] == [f"{job_id} line {i}" for i in (3, 4)]
    assert not rest["more"] and rest["status"] == "cancelled"
    assert client.http.get(f"/v1/jobs/{other}/logs").json()["error"]["code"] == "job_not_found"
    assert list(client.logs(job_id[:8], follow=True)) == page["items"] + rest["items"]  # ends: job is final
