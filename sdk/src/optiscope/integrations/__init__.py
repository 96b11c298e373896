"""One thin module per framework (Lightning, transformers, Keras 3), each imported lazily."""
