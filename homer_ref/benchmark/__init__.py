"""Benchmarks of HOMER against plain inference, and of our forward against HF's (`python -m homer_ref.bench`).

Everything is reported as ratios measured side by side in one run (shared CPU machines are noisy; absolute times
are only meaningful on a quiet machine), every run that reports a peak resident set in a process of its own.

measure.py    one prefill measured in a fresh process (time, live KV, peak RSS), the suites of lengths, the
              bench model (a random Llama of realistic depth) and the Llama-2-7B shape from its plan alone
hf.py         our forward against HF transformers' LlamaForCausalLM on the same weights, rounds back to back
user_path.py  the user's path: `python -m homer_ref.generate` with its defaults, a fresh process per run, an
              empty user cache (the first HOMER run computes the calibration table, the second finds it)
tables.py     the README's tables
"""
