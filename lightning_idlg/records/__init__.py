"""What a trial leaves and when two records are comparable: the record schema, metrics, evaluation, the
store (trials.jsonl, rank files), the run dir's lock and fingerprint, the paper's numbers, moved paths."""
