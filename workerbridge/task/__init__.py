"""The task layer: what runs inside a Spark task.

``bootstrap`` (the function Spark ships) lays out and loads the shipped
package, then runs a ``worker.Worker``: it launches the child (``launch``,
``supervise``), accepts and authenticates it, streams Arrow both ways
(``channel``), keeps warm children (``pool``) and writes lifecycle lines
(``logsink``).  Uses ``wire`` only.
"""
