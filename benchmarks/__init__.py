"""The benchmark suite: what only the benchmarks use, importing the library (`fusion_llm`), never the reverse.

- `grokking/`: the grokking track of ``compare_merges.py`` (tasks' experts, merges, fusion, the seed baseline);
- `lm/`: the language-modelling tracks (stand-ins pre-trained on three domains, and two real small LLMs), their
  LoRA controls and probes;
- `throughput/`: training and alignment throughput;
- `store`: the on-disk cache of finished stages, keyed by a hash of their recipe (both tracks).

The scripts beside this file (``compare_merges.py``, ``lm_track.py``, ``real_track.py``, ``lm_probes.py``,
``train_throughput.py``, ``alignment_throughput.py``) are thin command-line entry points.
"""
