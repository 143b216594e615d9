"""The text side: chat turns as one token stream, incremental detokenization, the codec the engine uses."""
