"""The one-layer benchmark of every form (``sparse-compile bench layer``, ``bench/``)."""
