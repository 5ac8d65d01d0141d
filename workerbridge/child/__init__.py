"""The children: ``python`` (PyScript) here, the R child (RScript) in ``rscripts/``.

Uses ``wire`` only, never pyspark, so it runs in any interpreter that has
pyarrow, pandas and cloudpickle.
"""
