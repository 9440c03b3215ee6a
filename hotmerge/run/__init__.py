"""One run and its outputs: `hotmerge evolve` end to end (evolve.py), the run directory
and its history (storage.py), result sinks (sinks.py), the progress display
(progress.py), merged-model export (export.py) and the report (report.py)."""
