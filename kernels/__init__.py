"""Kernels, each with one torch reference that is also its test oracle.

The reference lives with the component that uses it, and so does the one
dispatch point that picks an implementation (an explicit ``backend=`` argument,
``"auto"`` by default):

==================  ==============================  ==========================================
kernel              reference (oracle)              dispatch
==================  ==============================  ==========================================
``ngram_hash``      ``NgramHasher`` torch path       ``NgramHasher(backend="auto"|"torch"|"cpu_kernel")``
==================  ==============================  ==========================================

``ngram_hash`` is native C built on first use (``csrc/``); a missing compiler
leaves the torch path in charge.
"""
