"""Linear probes on frozen features: pooling, closed-form ridge and logistic fits, extraction."""
