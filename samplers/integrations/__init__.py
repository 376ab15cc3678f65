"""Adapters that run the sampler pipeline inside other generation loops.

``samplers.integrations.hf``: a Hugging Face ``transformers`` ``LogitsProcessor`` and helpers.
Importing this package imports nothing optional; ``hf`` needs the ``hf`` extra (transformers).
"""
