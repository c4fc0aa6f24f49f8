"""Text corpora, token stores and batch iterators."""
