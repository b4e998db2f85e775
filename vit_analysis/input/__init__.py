"""Images in: sources (digits, TFDS, folders), preprocessing, and the one streaming engine."""
