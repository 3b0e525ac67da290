"""Cross-entropy of a chunk of logits and its gradient in one pass (for the chunked loss)."""
