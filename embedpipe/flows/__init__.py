"""Prefect flows built from embedpipe's library steps (cli -> flows -> library).

Flows stay thin: each task is a batch of work that calls a plain function of the
library, so the logic is tested without Prefect and the flows only add orchestration,
state tracking and artifacts. Importing this package imports Prefect.
"""
