"""Command-line tools beside the trainer (``python -m lss_megatron.tools.NAME``)."""
