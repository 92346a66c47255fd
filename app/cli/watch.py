"""Following a job to its end (`submit --watch`, `status --watch`): live progress from the SSE stream,
then the summary, the download of the adapted weights and the exit code."""
from __future__ import annotations

from pathlib import Path

import click

from .options import EXIT_OK, STATUS_EXIT
from .render import Line, json_text, progress_text, summary_lines, transfer_progress


def follow(client, job_id: str, line: Line, poll: float = 1.0) -> dict:
    """Live progress from the SSE stream (polling when the server has none); returns the final job."""
    from ..client import ApiError

    state = {"status": "queued", "phase": None, "done": 0, "total": 0, "ips": None, "eta": None, "step": None}

    def render(force: bool = False) -> None:
        line.show(progress_text(state), key=(state["status"], state["phase"]), force=force)

    try:
        for ev in client.events(job_id):
            if ev.event in ("status", "end"):
                p = ev.data["progress"]
                state.update(status=ev.data["status"], phase=p["phase"], done=p["done"], total=p["total"])
                if ev.event == "end":
                    render(force=True)
                    line.done()
                    return ev.data
            elif ev.event == "progress":
                d = ev.data
                state.update(status=d.get("status", state["status"]), phase=d["phase"], done=d["done"],
                             total=d["total"])
                if d.get("images_per_second"):
                    state.update(ips=d["images_per_second"], eta=d.get("eta_s"))
                elif d["phase"] != "adapting":
                    state.update(ips=None, eta=None)
            elif ev.event == "step":
                state["step"] = ev.data
            render()
    except ApiError as exc:
        if exc.status != 404 or exc.code == "job_not_found":
            raise

    def on_update(job):  # a server without the events endpoint: poll
        p = job["progress"]
        state.update(status=job["status"], phase=p["phase"], done=p["done"], total=p["total"])
        render()

    job = client.wait(job_id, on_update=on_update, poll=poll)
    line.done()
    return job


def finish(client, job: dict, line: Line, output: str | None, download: bool, as_json: bool) -> int:
    """After a watched job: summary, download of the adapted weights, exit code."""
    for text in summary_lines(job):
        click.echo(text, err=True)
    if job["status"] == "succeeded" and download:
        dest = Path(output) if output else Path(f"adapted-{job['id'][:8]}.safetensors")
        path = client.download(job["id"], "model.safetensors", dest,
                               on_progress=transfer_progress("download model.safetensors", line))
        line.done()
        click.echo(f"adapted weights: {path}", err=True)
    if as_json:
        click.echo(json_text(job))
    return STATUS_EXIT.get(job["status"], EXIT_OK)
