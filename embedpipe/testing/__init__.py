"""Test helpers that are real components, not mocks: a loopback OpenAI-protocol server.

Import the server from its module (``embedpipe.testing.openai_server``); this package
imports nothing heavy so that importing it is free.
"""
