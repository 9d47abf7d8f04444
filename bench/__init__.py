"""The benchmark harness: ``python -m bench``. Each figure is measured beside its baseline, in the
same run, and printed as a table; results are written as JSON (bench/results/)."""
