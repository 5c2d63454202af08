"""The benchmark behind ``benchmarks/compare_merges.py``: feature fusion vs mergekit merges vs the seed baseline.

- `presets`: the schedules of the ``micro`` / ``quick`` / ``full`` presets;
- `training`: the one training loop (the seed's optimizer) with per-task ``step_val_acc_99``;
- `measure`: accuracy / loss per task, inference time, peak memory;
- `store`: a resumable on-disk cache of finished stages, keyed by a hash of their recipe;
- `grokking_track`: the stages (experts, merges, fusion, families, controls);
- `report`: means and standard errors over seeds, targets, the table, the plots.
"""
