"""One experiment end to end: its parts built once, the loops over groups or slots, ranks, progress,
W&B tracking, validation, pictures and the console summary."""
