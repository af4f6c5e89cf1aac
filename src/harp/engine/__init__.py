"""Running a model over text: text windows, perplexity, layer replay, tasks, the streamed model."""
