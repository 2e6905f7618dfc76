"""pagedserve frontend: tokenize, validate, detokenize, stop strings, stream."""
