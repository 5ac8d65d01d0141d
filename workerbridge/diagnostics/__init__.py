"""Lines in, pictures out: the task model read from lifecycle lines
(``tasks``), live progress (``progress``) and the timeline (``timeline``).
Uses ``wire`` only.
"""
