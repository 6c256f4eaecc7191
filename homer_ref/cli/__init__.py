"""The commands, one module each (`python -m homer_ref.<name>`, or the `homer-<name>` console script):

generate   continue a prompt; HOMER when it is longer than the trained context
trace      HOMER's full trace of given token ids (the answer key)
compare    the first divergence between two traces; --validate checks one
conformance  run an implementation on every fixture case and compare its traces
calibrate  the calibration bias table from a text
eval       passkey retrieval and perplexity: plain vs RoPE scaling vs HOMER
bench      memory and speed benchmarks
explain    a picture (one HTML file) of which tokens HOMER kept where in its tree
common     what every command shares: one-line errors, exit codes, progress, atomic writes
"""
