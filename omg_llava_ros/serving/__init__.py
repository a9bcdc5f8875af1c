"""Serving the vision graphs to many robots: a Triton Inference Server (`triton_server`, run in its
own environment) and the command that starts it (`cli`)."""
