"""The bottom layer: what crosses between processes.

Frames of the backend socket (``protocol``), the log-line format
(``logline``), the Gateway's challenge-response (``handshake``), the lifecycle vocabulary every Worker and child writes and the
diagnostics read (``lifecycle``), and the error types a task raises
(``errors``).  Imports nothing of workerbridge above it; the Python child
imports only this layer.
"""
