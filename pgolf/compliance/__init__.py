"""The challenge rules enforced on a run's own records: preflight, code provenance, the compliance verdicts."""
