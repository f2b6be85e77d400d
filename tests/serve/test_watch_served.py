"""`embedpipe watch` while `embedpipe serve` owns the data directory: the checks run in
the server as one `watch` job per index (the CLI could not open the engine itself), the
server records them, and `status` through the server shows the same warning."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .conftest import cli, package_config, start_server

MODEL = "text-embedding-3-small"
DOCS = [{"id": f"n{n}", "text": f"Note {n} is about {topic}."}
        for n, topic in enumerate(["glaciers", "compilers", "volcanoes", "caches", "rivers"])]


@pytest.mark.timeout(600)
def test_watch_runs_as_jobs_of_the_server_and_exits_6(tmp_path: Path, static_model_dir: Path,
                                                      openai_server) -> None:
    openai_server.load_model()
    config = package_config(tmp_path, static_model_dir, openai_server.base_url)
    config.write_text(config.read_text(encoding="utf-8")
                      + '[profiles.hosted.deprecation]\nreplacement = "static"\n', encoding="utf-8")
    served = start_server(config, tmp_path / "data")
    try:
        with served.client() as http:
            made = http.post("/v1/indexes/docs/documents", json={"documents": DOCS, "profile": "hosted"})
            assert made.status_code == 200, made.text
            done = cli(served, "watch", "--json")
            assert json.loads(done.stdout)["needs_action"] is False

            openai_server.retire(MODEL, 404)
            done = cli(served, "watch", "--json", check=False)
            assert done.returncode == 6, (done.stdout, done.stderr)
            report = json.loads(done.stdout)
            assert report["via"] == served.url
            (row,) = report["rows"]
            assert (row["index"], row["status"], row["provider_check"]["detail"]) == (
                "docs", "retired", "HTTP 404 model_not_found")
            assert (row["plan"]["to_profile"], row["plan"]["documents"]) == ("static", len(DOCS))

            jobs = http.get("/v1/jobs", params={"index": "docs"}).json()
            assert [j["kind"] for j in jobs if j["kind"] == "watch"] == ["watch", "watch"]
            assert all(j["state"] == "succeeded" for j in jobs if j["kind"] == "watch")
            refused = http.post("/v1/jobs", json={"kind": "watch", "index": "docs", "warn_days": -1})
            assert refused.status_code == 400 and "warn_days" in refused.text
            recorded = json.loads((served.data_dir / "watch" / "last.json").read_text(encoding="utf-8"))
            assert recorded["rows"]["docs"]["status"] == "retired"

            status = cli(served, "status")
            assert "warning: watch (" in status.stderr and "is retired" in status.stderr
            assert "deprecation watch " in status.stdout
    finally:
        assert served.stop() == 0, served.log_text()
