"""Independent float64 NumPy oracle ("the math") for homer_ref: a Llama forward and HOMER prefill.

Written from HOMER_SPEC.md and the HF Llama conventions only, never from the torch code in ``homer_ref/``,
so that agreement between the two means something. Modules: ``llama_np`` (loading + forward) and
``homer_np`` (HOMER prefill).
"""
