"""What the flows share about Prefect itself: reaching the server, naming artifacts."""

from __future__ import annotations

import re

from embedpipe.errors import PrefectUnavailable


def slug(name: str) -> str:
    """An artifact key: lowercase letters, digits and single dashes."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def check_prefect(require_server: bool = False) -> str | None:
    """Fail with one line, before anything is spent, when ``PREFECT_API_URL`` names a
    server that does not answer; returns its URL.

    Unset, Prefect starts a temporary server by itself, which is enough for one run;
    schedules (``require_server``) need a real one, since the temporary one has no
    scheduler.
    """
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        if require_server:
            raise PrefectUnavailable(
                "schedules need a running Prefect server (the temporary one has no scheduler): "
                "start one with `prefect server start`, then set "
                "PREFECT_API_URL=http://127.0.0.1:4200/api"
            )
        return None
    with get_client(sync_client=True) as client:
        problem = client.api_healthcheck()
    if problem is not None:
        unset = "" if require_server else " or unset PREFECT_API_URL to run on a temporary local server"
        raise PrefectUnavailable(
            f"cannot reach the Prefect server at {url} ({type(problem).__name__}); start it "
            f"(`prefect server start`){unset}"
        )
    return str(url)
