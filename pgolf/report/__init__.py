"""Multi-seed aggregation: statistics, submission.json and its schema, the submission folder, the HTML report."""
