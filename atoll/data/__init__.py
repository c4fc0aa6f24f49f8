"""Text corpora, token stores and batch iterators (`text`); robot demo datasets (`demos`)."""
