"""The evaluation stage: validation data, exact bpb scoring, score-first test-time training, eval-time planning."""
