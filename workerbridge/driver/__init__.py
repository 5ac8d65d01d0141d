"""The driver layer: what runs in the user's process.

``api`` (``spark_apply``, ``spark_log``) checks the call (``options``), packs
the closure (``closure``), settles the output schema (``schema``), finds the
session's Gateway (``session``, ``gateway``; its private files, ``privatefiles``;
Spark's own worker logs, ``sparklogs``) and wires the task into
``mapInArrow``.  Uses ``task``, ``diagnostics`` and ``wire``.
"""
