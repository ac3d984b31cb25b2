"""Lazy models: tensors as weighted sums of readers, sources, and the algebra."""
