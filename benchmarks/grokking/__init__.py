"""The grokking track of ``benchmarks/compare_merges.py``: feature fusion vs mergekit merges vs the seed baseline.

- `presets`: the schedules of the ``micro`` / ``quick`` / ``medium`` / ``full`` presets;
- `baseline`: the seed experiment's grokking transformer;
- `experts`: the task experts (a small LLM fine-tuned per task, and the family experts);
- `training`: the training loop of experts and controls (the seed's optimizer) with per-task ``step_val_acc_99``;
- `measure`: accuracy / loss per task, inference time, peak memory;
- `data`: the task rows as each expert's tokens;
- `stages`, `families`, `track`: the stages (experts, merges, fusion, families, controls) and their order;
- `report`: means and standard errors over seeds, targets, the table, the plots.
"""
