"""The HTTP API front-end: server (:mod:`vmsh.api.http`) and client (:mod:`vmsh.api.client`)."""
