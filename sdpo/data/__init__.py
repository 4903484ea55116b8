"""What goes in: reading and validating preference files, splitting them into steps, tokenizers and
chat templates, tokenized pairs, packing and batch schedules (``python -m sdpo.data check``).

Imports no model."""
