"""Evaluation: VBench / VBench-Long scoring and the offline shapes-world probe."""
