"""The language-modelling tracks.

- `pretraining`: domain stand-ins (the four families' classes, small) pre-trained on one corpus each;
- `track`: the stand-in LM track (``benchmarks/lm_track.py``): members alone, LoRA controls, merges, fusion;
- `real`: the real-members track (``benchmarks/real_track.py``): SmolLM2-135M and Gemma-3-270M;
- `probes`: what the fused model can import from its members (``benchmarks/lm_probes.py``).
"""
